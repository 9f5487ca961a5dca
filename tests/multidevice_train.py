"""Run with 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8):
stage-2 training on a 2x2x2 (data, fsdp, tensor) mesh against one device, and checkpoints
moved between the meshes (8 -> 1 -> 8). Prints one JSON line."""

from __future__ import annotations

import json
import os
import sys
import tempfile

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from clara_jax.model import ModelConfig, init_params  # noqa: E402
from clara_jax.model.sharding import make_mesh  # noqa: E402
from clara_jax.train import checkpoint as ckpt  # noqa: E402
from clara_jax.train.state import abstract_state, create_state, state_shardings  # noqa: E402
from clara_jax.train.steps import (  # noqa: E402
    batch_fields,
    batch_shardings,
    compile_train_step,
    make_eval_step,
    make_train_step,
    rng_for_step,
)
from configs import tiny  # noqa: E402
from tests.train_support import SyntheticLoader  # noqa: E402

STAGE = 2
STEPS = 4


def main() -> None:
    config = tiny.get_config()
    config.train.stage = STAGE
    config.train.learning_rate = 3e-3
    config.model.lora.dropout = 0.1  # dropout keys must not depend on the mesh either
    cfg = ModelConfig.from_config(config)
    params = init_params(cfg, jax.random.key(0))
    batches = [next(loader) for loader in [SyntheticLoader(config, STAGE)] for _ in range(STEPS)]
    fields = batch_fields(config, STAGE)
    abstract = abstract_state(config, cfg, STAGE)
    eval_batch = next(SyntheticLoader(config, STAGE, seed=7))

    def setup(mesh):
        sh = state_shardings(cfg, mesh, abstract)
        step, b_sh = compile_train_step(make_train_step(config, cfg, STAGE, params), mesh, sh,
                                        abstract, fields)
        ev = jax.jit(make_eval_step(config, cfg, STAGE), in_shardings=(sh.params, b_sh),
                     out_shardings=NamedSharding(mesh, PartitionSpec()))
        return sh, step, b_sh, ev

    def run(mesh):
        sh, step, b_sh, ev = setup(mesh)
        # From host copies: on one device, device_put would alias `params`, which the donating
        # step would then delete.
        host = jax.tree.map(np.asarray, params)
        state = jax.device_put(create_state(config, host, STAGE), sh)
        losses = []
        for i, b in enumerate(batches):
            state, m = step(state, jax.device_put(b, b_sh), rng_for_step(state.rng, i))
            losses.append(float(m["loss"]))
        return losses, state, (sh, b_sh, ev)

    mesh1 = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    mesh8 = make_mesh(2, 2, 2)
    losses1, _, _ = run(mesh1)
    losses8, state8, (sh8, b_sh8, ev8) = run(mesh8)
    q = state8.params["decoder"]["layers_0"]["attn"]["q"]["kernel"]

    with tempfile.TemporaryDirectory() as tmp:
        m8 = ckpt.make_manager(os.path.join(tmp, "a"))
        ckpt.save(m8, state8, {"index": STEPS}, {"stage": STAGE, "step": STEPS})
        m8.wait_until_finished()
        sh1, _, b_sh1, ev1 = setup(mesh1)
        state1, data_state, _ = ckpt.restore(m8, abstract, sh1)
        m8.close()
        eval8 = float(ev8(state8.params, jax.device_put(eval_batch, b_sh8))["loss"])
        eval1 = float(ev1(state1.params, jax.device_put(eval_batch, b_sh1))["loss"])
        on_one = {leaf.sharding.mesh.size for leaf in jax.tree.leaves(state1)}
        m1 = ckpt.make_manager(os.path.join(tmp, "b"))
        ckpt.save(m1, state1, data_state, {"stage": STAGE, "step": STEPS})
        m1.wait_until_finished()
        back, _, _ = ckpt.restore(m1, abstract, sh8)
        m1.close()
        same_back = all(np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding == b.sharding
                        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state8)))

    print(json.dumps({
        "devices": len(jax.devices()),
        "losses_1": losses1, "losses_8": losses8,
        "max_loss_diff": max(abs(a - b) for a, b in zip(losses1, losses8)),
        "q_kernel_spec": [str(a) for a in q.sharding.spec],
        "eval_loss_8": eval8, "eval_loss_1": eval1, "restored_mesh_sizes": sorted(on_one),
        "data_state": data_state, "roundtrip_8_1_8_equal": same_back,
        "batch_shardings": sorted({str(s.spec) for s in batch_shardings(mesh8, fields).values()}),
    }))


if __name__ == "__main__":
    main()
