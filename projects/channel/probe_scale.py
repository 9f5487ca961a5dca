"""Probe: does the scale of the latent inputs against the token embeddings gate the channel?

At random init the generator's latent inputs (`latent_up` of RMS-normalised states, lecun
init) have an RMS of about 1 per element, the token embeddings 0.02 (`model.init_std`): a
slot's residual stream is ~50x a token's, so AdamW steps of the same size turn a slot's
direction 50x more slowly. This probe multiplies the initial `latent_up` kernel (and bias) by
`--latent_up_scale` and runs `bench/channel.py`'s copy task otherwise unchanged.

    .venv/bin/python projects/channel/probe_scale.py --latent_up_scale 0.02 --lengths 32 \
        --minutes 8 --eval_every 100 --set train.mse_weight=0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import channel  # noqa: E402
import jax  # noqa: E402

from clara_jax.config import load_config_file  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--latent_up_scale", type=float, default=1.0)
    p.add_argument("--memory_scale", type=float, default=1.0,
                   help="multiplies the initial memory embeddings")
    p.add_argument("--lengths", default="32")
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    overrides = ["train.lambda_retrieval=0", "train.train_base=true", *channel.COPY_OVERRIDES,
                 *args.set]
    config = load_config_file(str(REPO / "configs/demo.py"), overrides)
    params, tok = channel.start_params(config, "random", args.seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * args.latent_up_scale if "latent_up" in jax.tree_util.keystr(path)
        else x * args.memory_scale if "memory_embeddings" in jax.tree_util.keystr(path) else x,
        params)
    runs = {n: channel.run_length(config, params, tok, int(n), args.minutes, args.eval_every,
                                  args.seed) for n in args.lengths.split(",")}
    for r in runs.values():
        r.pop("curve")
    print(json.dumps({"latent_up_scale": args.latent_up_scale, "memory_scale": args.memory_scale,
                      "overrides": overrides, "runs": runs}))


if __name__ == "__main__":
    main()
