"""Where a test's seconds go: tracing + lowering against XLA compilation of the tiny config's
train steps (stages 1-3), under XLA flag variants, each in a fresh process without the
persistent compilation cache.

    .venv/bin/python projects/suite_time/compile_probe.py [--variants base,o0,...]

One JSON line per variant: {"variant", "xla_flags", "stages": {stage: {"lower_s",
"compile_s", "step_ms"}}, "total_lower_s", "total_compile_s"}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

VARIANTS = {
    "base": "",
    "o0": "--xla_backend_optimization_level=0",
    "o0_noexp": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    "o0_split1": "--xla_backend_optimization_level=0 --xla_cpu_parallel_codegen_split_count=1",
}


def child() -> None:
    sys.path.insert(0, str(REPO))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec

    from clara_jax.model import ModelConfig, init_params
    from clara_jax.model.sharding import DEFAULT_RULES, make_mesh
    from clara_jax.train.state import create_state, init_query_adapter, state_shardings
    from clara_jax.train.steps import batch_fields, batch_shardings, make_train_step
    from configs import tiny

    sys.path.insert(0, str(REPO / "bench"))
    from train_step import random_batch

    out = {}
    for stage in (1, 2, 3):
        config = tiny.get_config()
        config.train.stage = stage
        cfg = ModelConfig.from_config(config)
        mesh = make_mesh(1, 1, 1)
        params = init_params(cfg, jax.random.key(0))
        if stage == 3:
            params = init_query_adapter(params)
        state = create_state(config, params, stage)
        sh = state_shardings(cfg, mesh, state)
        abstract = jax.eval_shape(lambda s: s, state)
        fields = batch_fields(config, stage)
        step_fn = make_train_step(config, cfg, stage, abstract.params)
        b_sh = batch_shardings(mesh, fields)
        rep = NamedSharding(mesh, PartitionSpec())

        def wrapped(state, batch, rng, step_fn=step_fn):
            return step_fn(state, batch, jax.random.wrap_key_data(rng))

        jitted = jax.jit(wrapped, in_shardings=(sh, b_sh, rep), out_shardings=(sh, rep),
                         donate_argnums=(0,))
        with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
            t0 = time.perf_counter()
            lowered = jitted.lower(abstract, fields, jax.ShapeDtypeStruct((2,), jnp.uint32))
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
        st = jax.device_put(jax.tree.map(np.asarray, state), sh)
        batch = jax.device_put(random_batch(config, stage, 0), b_sh)
        times = []
        for i in range(4):
            s0 = time.perf_counter()
            st, m = compiled(st, batch, np.array([0, i], np.uint32))
            jax.block_until_ready((st, m))
            times.append(time.perf_counter() - s0)
        out[stage] = {"lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
                      "step_ms": round(1000 * float(np.median(times[1:])), 1)}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    for name in args.variants.split(","):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("JAX_COMPILATION_CACHE") and k != "XLA_FLAGS"}
        env.update(XLA_FLAGS=VARIANTS[name], JAX_PLATFORMS="cpu",
                   JAX_ENABLE_COMPILATION_CACHE="false")
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, __file__, "--child"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=1200)
        if res.returncode:
            print(json.dumps({"variant": name, "error": res.stderr[-1500:]}))
            continue
        stages = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps({"variant": name, "xla_flags": VARIANTS[name], "stages": stages,
                          "total_lower_s": round(sum(s["lower_s"] for s in stages.values()), 2),
                          "total_compile_s": round(
                              sum(s["compile_s"] for s in stages.values()), 2),
                          "process_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        child()
    else:
        main()
