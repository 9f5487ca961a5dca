"""Per-device memory of the train step under each `model.remat` policy and base dtype, from
XLA's memory analysis of the compiled step (`clara_jax.aot.compile_train`, as `clara
compile` and `clara train` build it), side by side on fake CPU devices:

    .venv/bin/python bench/remat_memory.py [--config configs/tiny.py] [--shape 7b_small]
        [--stage 2] [--fsdp 8] [--layers 2,4] [--policies dots_no_batch,full,projections]
        [--base_dtypes float32,bfloat16] [--set model.lora.dropout=0.1 ...]

`--shape 7b_small` swaps in a scaled-down Mistral-7B shape that compiles on a CPU in about
a minute: head_dim 128, 4:1 grouped-query heads, F = 3.5 D, LoRA r16 with dropout (so the
bfloat16 adapters run as separate matmuls, as in configs/mistral_7b.py), bfloat16 compute,
scanned layers, 256-token documents at 16x, K = 5, 2 rows per device (the 7B config's 32 over
fsdp=16). Each row is compiled at every `--layers` depth; the temporaries' growth per layer
is what a policy saves for the backward pass (XLA:CPU's totals also hold the work space of
one layer's recompute, which depends on the backend). Prints one JSON object per compile and
a markdown table on stderr.

`--residuals` compiles nothing: it traces the stage's loss with abstract inputs and sums what
each policy saves for the backward pass (`jax.ad_checkpoint`'s saved residuals, less the
params and the batch), exactly and for any backend, so it runs on the full-size config too
(`--config configs/mistral_7b.py --residuals --layers 32`); the batch-sized residuals are
divided over the mesh's batch devices (`--fsdp`) for the per-device figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _shape_7b_small(c) -> None:
    m = c.model
    m.vocab_size, m.dim, m.n_heads, m.n_kv_heads, m.head_dim = 4096, 1024, 8, 2, 128
    m.mlp_dim, m.max_len, m.latent_dim, m.scan_layers, m.dtype = 3584, 2048, 0, True, "bfloat16"
    m.lora.rank, m.lora.alpha, m.lora.dropout = 16, 32.0, 0.1
    d = c.data
    d.doc_max_len, d.compression_rate, d.chunk_overlap, d.num_docs = 256, 16, 32, 5
    d.num_candidates, d.question_max_len, d.answer_max_len = 20, 64, 32
    d.paraphrase_max_len = 256


def saved_bytes(config, stage: int, batch_devices: int) -> dict:
    """Bytes of the activations the stage's loss saves for its backward pass under the
    config's remat policy (params and batch excluded: they are held anyway), in total, per
    device with the batch split over `batch_devices`, and the float32 part."""
    import jax
    import numpy as np
    from jax._src.ad_checkpoint import saved_residuals  # jax.ad_checkpoint prints only

    from clara_jax.model import ModelConfig, abstract_params
    from clara_jax.train.steps import batch_fields, make_loss_fn

    cfg = ModelConfig.from_config(config)
    loss_fn = make_loss_fn(config, cfg, stage)
    residuals = saved_residuals(lambda p, b: loss_fn(p, b, jax.random.key(0))[0],
                                abstract_params(cfg), batch_fields(config, stage))
    total = per_device = f32 = 0
    batch = int(config.train.batch_size)
    for aval, source in residuals:
        if source.startswith("from the argument"):
            continue
        n = int(np.prod(aval.shape)) * aval.dtype.itemsize  # dropout keys included
        total += n
        f32 += n if aval.dtype == np.float32 else 0
        # A scanned residual is [layers, batch rows, ...]; the compressor's rows are
        # batch x K documents. Either way the rows split over the batch devices.
        rows = aval.shape[1] if len(aval.shape) > 1 and aval.shape[0] == cfg.n_layers \
            else (aval.shape[0] if aval.shape else 0)
        per_device += n // batch_devices if rows and rows % batch == 0 else n
    return {"saved_bytes": total, "saved_bytes_per_device": per_device,
            "saved_float32_bytes": f32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--shape", choices=("config", "7b_small"), default="config")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--fsdp", type=int, default=8)
    ap.add_argument("--rows_per_device", type=int, default=2)
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--policies", default="dots_no_batch,full,projections")
    ap.add_argument("--base_dtypes", default="float32,bfloat16")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--residuals", action="store_true",
                    help="count the saved residuals instead of compiling")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flag = f"--xla_force_host_platform_device_count={args.fsdp}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

    from clara_jax import aot
    from clara_jax.config import finalize, load_config_file
    from clara_jax.model.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=args.fsdp, tensor=1)
    rows = []
    for base_dtype in args.base_dtypes.split(","):
        for policy in args.policies.split(","):
            for layers in [int(x) for x in args.layers.split(",")]:
                sets = [f"model.remat={policy}", f"model.base_dtype={base_dtype}",
                        f"model.n_layers={layers}",
                        f"train.batch_size={args.rows_per_device * args.fsdp}",
                        "train.train_base=False", "mesh.data=1", f"mesh.fsdp={args.fsdp}"]
                config = load_config_file(args.config, sets + args.set)
                if args.shape == "7b_small":  # then validated again, M derived again
                    _shape_7b_small(config)
                    finalize(config)
                if args.residuals:
                    row = {"config": args.config, "shape": args.shape, "stage": args.stage,
                           "layers": layers, "remat": policy, "base_dtype": base_dtype,
                           **saved_bytes(config, args.stage, args.fsdp)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                result = aot.compile_train(config, mesh, args.stage)
                mem = aot.memory(result.compiled)
                row = {"config": args.config, "shape": args.shape, "stage": args.stage,
                       "fsdp": args.fsdp, "layers": layers, "remat": policy,
                       "base_dtype": base_dtype, "compile_s": round(result.compile_s, 1),
                       "param_bytes": aot.param_bytes_per_chip(config, mesh), **mem}
                rows.append(row)
                print(json.dumps(row), flush=True)
    mib = 2**20
    if args.residuals:
        print("| remat | layers | saved GiB (global) | saved GiB per device | float32 share |",
              file=sys.stderr)
        print("| --- | --- | --- | --- | --- |", file=sys.stderr)
        for r in rows:
            print(f"| {r['remat']} | {r['layers']} | {r['saved_bytes'] / 2**30:.3f} | "
                  f"{r['saved_bytes_per_device'] / 2**30:.3f} | "
                  f"{r['saved_float32_bytes'] / max(r['saved_bytes'], 1):.2f} |", file=sys.stderr)
        return
    print("| base | remat | layers | params MiB | arguments MiB | temporaries MiB | "
          "temporaries per layer MiB |", file=sys.stderr)
    print("| --- | --- | --- | --- | --- | --- | --- |", file=sys.stderr)
    for r in rows:
        same = [o for o in rows if o["remat"] == r["remat"] and o["base_dtype"] == r["base_dtype"]]
        lo, hi = min(same, key=lambda o: o["layers"]), max(same, key=lambda o: o["layers"])
        per = ((hi["temp_bytes"] - lo["temp_bytes"]) / (hi["layers"] - lo["layers"]) / mib
               if hi["layers"] > lo["layers"] else float("nan"))
        print(f"| {r['base_dtype']} | {r['remat']} | {r['layers']} | {r['param_bytes'] / mib:.2f} "
              f"| {r['argument_bytes'] / mib:.2f} | {r['temp_bytes'] / mib:.2f} | {per:.2f} |",
              file=sys.stderr)


if __name__ == "__main__":
    main()
