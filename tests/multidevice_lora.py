"""Run with 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8):
the tiny model's stage-2 train state, base in bfloat16, on a data=1 x fsdp=8 mesh. Reports
which LoRA factors and Adam moments are placed whole on every device (none should be), their
bytes per device and in total, and the losses of two steps of the compiled train step
(`clara_jax.aot.compile_train`'s sharding check included). Prints one JSON line."""

from __future__ import annotations

import json
import math
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from clara_jax import aot  # noqa: E402
from clara_jax.config import finalize  # noqa: E402
from clara_jax.model import ModelConfig, init_params, param_group  # noqa: E402
from clara_jax.model.sharding import make_mesh  # noqa: E402
from clara_jax.train.state import _param_path, create_state, state_shardings  # noqa: E402
from clara_jax.train.steps import (  # noqa: E402
    batch_fields,
    compile_train_step,
    make_train_step,
    rng_for_step,
)
from configs import tiny  # noqa: E402
from tests.train_support import SyntheticLoader  # noqa: E402

STAGE = 2


def _is_lora(path) -> bool:
    keys = _param_path(path)
    return bool(keys) and keys[-1].startswith("lora_")


def main() -> None:
    config = tiny.get_config()
    config.train.stage = STAGE
    config.train.batch_size = 8
    config.model.base_dtype = "bfloat16"
    config.mesh.data, config.mesh.fsdp = 1, 8
    finalize(config)
    cfg = ModelConfig.from_config(config)
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    state = create_state(config, init_params(cfg, jax.random.key(0)), STAGE)
    abstract = jax.eval_shape(lambda s: s, state)
    shardings = state_shardings(cfg, mesh, abstract)
    state = jax.device_put(state, shardings)

    report = {"mesh": dict(mesh.shape), "replicated_lora": [], "replicated_moments": []}
    lora = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(state.params) if _is_lora(p)]
    trainable = [(p, x) for p, x in lora if param_group(p) in ("adapter:compressor",
                                                                "adapter:generator")]
    report["lora_leaves"], report["trainable_lora_leaves"] = len(lora), len(trainable)
    report["replicated_lora"] = [jax.tree_util.keystr(p) for p, x in lora
                                 if x.sharding.is_fully_replicated]
    report["lora_bytes_total"] = sum(x.nbytes for _, x in lora)
    report["lora_bytes_per_device"] = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for _, x in lora)
    moments = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
               if np.ndim(x) > 0 and _is_lora(p)]
    report["moment_leaves"] = len(moments)
    report["replicated_moments"] = [jax.tree_util.keystr(p) for p, x in moments
                                    if x.sharding.is_fully_replicated]
    report["moment_bytes_total"] = sum(x.nbytes for _, x in moments)
    report["moment_bytes_per_device"] = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for _, x in moments)
    report["base_dtypes"] = sorted({str(x.dtype) for p, x in
                                    jax.tree_util.tree_leaves_with_path(state.params)
                                    if param_group(p) == "base"})

    # `clara compile`'s path: compiled from abstract inputs, its input shardings checked.
    report["sharding_mismatches"] = aot.compile_train(config, mesh, STAGE).sharding_mismatches
    step, _ = compile_train_step(make_train_step(config, cfg, STAGE, abstract.params), mesh,
                                 shardings, abstract, batch_fields(config, STAGE))
    loader = SyntheticLoader(config, STAGE)
    losses = []
    for i in range(2):
        state, m = step(state, next(loader), rng_for_step(state.rng, i))
        losses.append(float(m["loss"]))
    report["losses"] = losses
    print(json.dumps(report))


if __name__ == "__main__":
    main()
