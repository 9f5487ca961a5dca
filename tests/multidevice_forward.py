"""Run with 8 simulated CPU devices: params and batch sharded over a (data, fsdp, tensor) mesh
by the logical rules give the same logits and latents as one device. Prints one JSON line."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clara_jax.model import (  # noqa: E402
    ModelConfig,
    compress,
    forward_logits,
    init_params,
    logical_specs,
)
from clara_jax.model.sharding import batch_sharding, logical_to_shardings, make_mesh  # noqa: E402
from configs import tiny  # noqa: E402


def main() -> None:
    cfg = ModelConfig.from_config(tiny.get_config())
    cfg = dataclasses.replace(cfg, scan_layers=True)
    params = init_params(cfg, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (8, 12), 1, cfg.vocab_size)
    ref_logits = forward_logits(cfg, params, toks)
    ref_lat = compress(cfg, params, toks, jnp.ones(toks.shape, bool))

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = logical_to_shardings(logical_specs(cfg), mesh)
    sharded = jax.device_put(params, shardings)
    batch = jax.device_put(toks, batch_sharding(mesh, 2))
    fwd = jax.jit(lambda p, t: forward_logits(cfg, p, t), in_shardings=(shardings, batch.sharding))
    enc = jax.jit(lambda p, t: compress(cfg, p, t, jnp.ones(t.shape, bool)),
                  in_shardings=(shardings, batch.sharding))
    logits, lat = fwd(sharded, batch), enc(sharded, batch)
    q_kernel = sharded["decoder"]["layers"]["attn"]["q"]["kernel"]
    print(json.dumps({
        "devices": len(jax.devices()),
        "mesh": dict(mesh.shape),
        "q_kernel_spec": [str(a) for a in q_kernel.sharding.spec],
        "q_kernel_shard_shape": list(q_kernel.addressable_shards[0].data.shape),
        "logits_max_diff": float(np.max(np.abs(np.asarray(logits) - np.asarray(ref_logits)))),
        "latents_max_diff": float(np.max(np.abs(np.asarray(lat) - np.asarray(ref_lat)))),
    }))


if __name__ == "__main__":
    main()
