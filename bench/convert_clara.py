"""Time and peak host memory of `clara convert from-clara` and `to-clara` on a synthetic
checkpoint of CLaRa-7B's shapes (Mistral-7B base: D 4096, F 14336, N 32, G 8, V 32000; M = 16,
LoRA rank 16 on all seven linears of three adapters, <MEM0..15> <AE> <ENC> <SEP> added).

    .venv/bin/python bench/convert_clara.py [--layers 2 6] [--full_layers 32]

A full 7B base is 28 GB in float32, more than this machine's disk and memory hold next to its
conversion, so the base is written with each `--layers` count (random float32, streamed by
bench/convert_hf.py's writer) and the time of the `--full_layers` model is extrapolated
linearly from the two counts: conversion is one pass over the tensors, a fixed part (embedding,
lm_head, tokenizer, orbax) plus a per-layer part. Each conversion runs in a fresh subprocess
(from-clara with --param_dtype=bfloat16, to-clara with --dtype=bfloat16, as one would for 7B).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SHAPE = dict(dim=4096, vocab=32000, mlp=14336, heads=32, kv_heads=8)
M, RANK, DOC_MAX_LENGTH = 16, 16, 256


def make_source(root: Path, layers: int) -> dict:
    """base/ (a random Mistral-shaped decoder and a 32000-word tokenizer) and clara/ (the
    reference layout, bfloat16 as the reference saves it); returns their sizes in bytes."""
    import ml_dtypes
    import numpy as np
    from convert_hf import make_checkpoint
    from tokenizers import Tokenizer, models

    from clara_jax.convert import clara, hf
    from clara_jax.convert.pth import write_pth

    base, src = root / "base", root / "clara"
    make_checkpoint(base, SHAPE["dim"], layers, SHAPE["vocab"], SHAPE["mlp"], SHAPE["heads"],
                    SHAPE["kv_heads"])
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(SHAPE["vocab"] - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(base / "tokenizer.json"))
    (base / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                            "eos_token": "</s>"}))
    config = {"model_type": "CLaRa", "lora": True, "lora_r": RANK, "doc_max_length":
              DOC_MAX_LENGTH, "compr_rate": DOC_MAX_LENGTH // M, "different_mem_tokens": True,
              "sep": True, "training_stage": "stage2", "generation_top_k": 5,
              "decoder_model_name": str(base)}
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    bf16 = ml_dtypes.bfloat16
    d, f, h = SHAPE["dim"], SHAPE["mlp"], SHAPE["dim"] // SHAPE["heads"]
    fan = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, SHAPE["kv_heads"] * h),
           "self_attn.v_proj": (d, SHAPE["kv_heads"] * h), "self_attn.o_proj": (d, d),
           "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}
    adapters = {}
    for name in clara.ADAPTERS:
        state = {}
        for i in range(layers):
            for module, (fan_in, fan_out) in fan.items():
                p = f"model.layers.{i}.{module}"
                state[p + ".lora_A.weight"] = (rng.standard_normal((RANK, fan_in), np.float32)
                                               * 0.02).astype(bf16)
                state[p + ".lora_B.weight"] = (rng.standard_normal((fan_out, RANK), np.float32)
                                               * 0.02).astype(bf16)
        adapters[name] = state
    write_pth(src / clara.ADAPTERS_FILE, adapters)
    rows = SHAPE["vocab"] + M + len(clara.AFTER_MEMORY)
    write_pth(src / clara.FIRST_LAST_FILE,
              {k: (rng.standard_normal((rows, d), np.float32) * 0.02).astype(bf16)
               for k in (clara.EMBED, clara.LM_HEAD)})
    return {"base_bytes": (base / hf.SINGLE_FILE).stat().st_size,
            "adapters_bytes": (src / clara.ADAPTERS_FILE).stat().st_size,
            "first_last_bytes": (src / clara.FIRST_LAST_FILE).stat().st_size}


def child(direction: str, src: str, dst: str) -> None:
    from convert_hf import _peak_rss_bytes, _RssSampler

    from clara_jax.convert import clara

    sampler = _RssSampler()
    start = time.perf_counter()
    if direction == "from-clara":
        clara.from_clara(src, dst, param_dtype="bfloat16", progress=False)
    else:
        clara.to_clara(src, dst, dtype="bfloat16", progress=False)
    print(json.dumps({"seconds": round(time.perf_counter() - start, 2),
                      "peak_rss": _peak_rss_bytes(), "peak_anon": sampler.peak["RssAnon"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 6])
    parser.add_argument("--full_layers", type=int, default=32)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    runs = {}
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            run = make_source(root, layers)
            for direction, src, dst in (("from-clara", root / "clara", root / "ours"),
                                        ("to-clara", root / "ours", root / "ref")):
                out = subprocess.run([sys.executable, __file__, "--child", direction, str(src),
                                      str(dst)], capture_output=True, text=True, check=True)
                run[direction] = json.loads(out.stdout.strip().splitlines()[-1])
            runs[layers] = run
    (a, b), n = args.layers, args.full_layers
    extrapolated = {}
    for direction in ("from-clara", "to-clara"):
        ta, tb = runs[a][direction]["seconds"], runs[b][direction]["seconds"]
        per_layer = (tb - ta) / (b - a)
        if per_layer <= 0:  # the layer difference drowned in noise (shared CPUs, compiles)
            extrapolated[direction] = {"unreliable": f"{b} layers took no longer than {a}; "
                                                     "rerun with layer counts further apart"}
            continue
        extrapolated[direction] = {"per_layer_s": round(per_layer, 2),
                                   "fixed_s": round(ta - per_layer * a, 2),
                                   f"seconds_at_{n}_layers": round(ta + per_layer * (n - a), 1)}
    print(json.dumps({"shape": {**SHAPE, "M": M, "lora_rank": RANK}, "runs": runs,
                      "extrapolated": extrapolated,
                      "note": f"measured at {a} and {b} layers, extrapolated linearly to {n}"}))


if __name__ == "__main__":
    main()
