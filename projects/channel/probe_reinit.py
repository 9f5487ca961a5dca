"""Probe: is the shipped start's collapsed latent path (shared 0.99 before any step) held in the
memory embeddings and latent projections, or in the decoder they feed?

Starts from the shipped demo start and replaces the parameters whose path contains one of
`--reinit` (comma-separated substrings, e.g. "memory_embeddings,latent_down,latent_up") with
their random initialisation, then runs `bench/channel.py`'s copy task unchanged.

    .venv/bin/python projects/channel/probe_reinit.py \
        --reinit memory_embeddings,latent_down,latent_up --lengths 8 --max_steps 400
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
from clara_jax.model import ModelConfig, init_params  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reinit", default="memory_embeddings,latent_down,latent_up")
    p.add_argument("--lengths", default="8")
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--max_steps", type=int)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    overrides = ["train.lambda_retrieval=0", "train.train_base=true", *channel.COPY_OVERRIDES,
                 *args.set]
    config = load_config_file(str(REPO / "configs/demo.py"), overrides)
    shipped, tok = channel.start_params(config, "shipped", args.seed)
    fresh = init_params(ModelConfig.from_config(config), jax.random.key(args.seed))
    names = [n for n in args.reinit.split(",") if n]
    params = jax.tree_util.tree_map_with_path(
        lambda path, s, f: f if any(n in jax.tree_util.keystr(path) for n in names) else s,
        shipped, fresh)
    runs = {n: channel.run_length(config, params, tok, int(n), args.minutes, args.eval_every,
                                  args.seed, args.max_steps) for n in args.lengths.split(",")}
    for r in runs.values():
        r.pop("curve")
    print(json.dumps({"reinit": names, "overrides": overrides, "runs": runs}))


if __name__ == "__main__":
    main()
