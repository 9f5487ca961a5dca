"""Probe: open the channel with appended memory tokens, then assign spans by interleaving.

The appended layout opens the 4x copy channel by ~500 steps but plateaus at ~63% with whole
positions never taken; the interleaved layout takes every position but opens ~2,000 steps
later (README.md here). Hypothesis: training `append` for `--switch` steps and then the same
parameters and optimizer state under `interleave` keeps the fast opening and fills the holes.
Confirms if held-out accuracy passes 63% within the time budget with no position at chance.

    .venv/bin/python projects/channel/probe_switch.py --switch 1000 --minutes 12
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import channel  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clara_jax.config import load_config_file  # noqa: E402
from clara_jax.model import ModelConfig  # noqa: E402
from clara_jax.train.state import create_state  # noqa: E402
from clara_jax.train.steps import make_train_step  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--switch", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--eval_every", type=int, default=100)
    args = p.parse_args()
    base = ["train.lambda_retrieval=0", "train.train_base=true", *channel.COPY_OVERRIDES]
    configs = {layout: channel.copy_config(load_config_file(
        str(REPO / "configs/demo.py"), base + [f"model.memory_layout={layout}"]), args.n)
        for layout in ("append", "interleave")}
    params, tok = channel.start_params(configs["append"], "random", 0)
    cfgs = {k: ModelConfig.from_config(c) for k, c in configs.items()}
    steps = {k: jax.jit(make_train_step(configs[k], cfgs[k], 1, params), donate_argnums=(0,))
             for k in configs}
    evals = {k: channel.make_eval(cfgs[k]) for k in configs}
    m, td = cfgs["append"].num_memory_tokens, int(configs["append"].data.doc_max_len)
    alphabet = channel.alphabet_ids(tok)
    rng = np.random.default_rng(0)
    held = channel.copy_batch(tok, alphabet[rng.integers(0, channel.ALPHABET,
                                                         (channel.HELDOUT, args.n))], m, td)
    pos = channel.doc_positions(held, args.n)
    held = jax.tree.map(jnp.asarray, held)
    state = create_state(configs["append"], params, stage=1, seed=0)
    batch_size = int(configs["append"].train.batch_size)
    start, i, curve = time.perf_counter(), 0, []
    while True:
        layout = "append" if i < args.switch else "interleave"
        if i % args.eval_every == 0:
            by_pos, lat, _ = evals[layout](state.params, held, pos)
            acc = float(jnp.mean(by_pos))
            curve.append({"step": i, "layout": layout, "seconds":
                          round(time.perf_counter() - start, 1), "token_accuracy": round(acc, 4),
                          **channel.collapse_stats(lat)})
            print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
            if acc >= 0.9 or time.perf_counter() - start > args.minutes * 60:
                break
        docs = alphabet[rng.integers(0, channel.ALPHABET, (batch_size, args.n))]
        batch = channel.copy_batch(tok, docs, m, td)
        state, _ = steps[layout](state, batch, jax.random.key(i))
        i += 1
    print(json.dumps({"n": args.n, "switch": args.switch, "steps": i,
                      "final_token_accuracy": curve[-1]["token_accuracy"],
                      "accuracy_by_position": [round(float(a), 3) for a in by_pos],
                      "curve": curve}))


if __name__ == "__main__":
    main()
