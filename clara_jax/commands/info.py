"""`clara info --config=...`: parameter counts per group and bytes, via jax.eval_shape."""

from __future__ import annotations

import json
import math

import jax

from clara_jax.commands.common import define_config_flag, load_config
from clara_jax.model import ModelConfig, abstract_params, count_params

define_config_flag()


def main(argv) -> None:
    del argv
    cfg = ModelConfig.from_config(load_config())
    abstract = abstract_params(cfg)
    counts = count_params(abstract)
    nbytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(abstract))
    print(json.dumps({"params": counts, "param_bytes": nbytes,
                      "num_memory_tokens": cfg.num_memory_tokens,
                      "latent_width": cfg.latent_width}, indent=2))
