"""Data benchmark: world generation, tokenizer training, TFDS builds and loader throughput.

  .venv/bin/python bench/data.py [--config configs/demo.py] [--size small] [--batches 50]

Prints progress lines, then one JSON object on the last line: rows per file, token statistics
of the world and of the shared real data (../shared/data/ml-clara-example), vocabulary size,
build seconds and loader batches per second per stage.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "ml-clara-example" / "pretrain_data.800.jsonl"
sys.path.insert(0, str(REPO))


def _config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main() -> None:
    from clara_jax.data import pipeline, prepare, tfds_build

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.py")
    ap.add_argument("--size", default="small", choices=["small", "medium"])
    ap.add_argument("--batches", type=int, default=50)
    args = ap.parse_args()
    config = _config(args.config)
    result = {"config": args.config, "size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "world"
        summary = prepare.prepare_world(out, config, seed=0, size=args.size)
        result["world_seconds"] = summary["world_seconds"]
        result["tokenizer"] = summary["tokenizer"]
        result["total_prepare_seconds"] = summary["total_seconds"]
        result["rows"] = {s: v["rows"] for s, v in summary["world"]["splits"].items()}
        result["builds"] = {}
        for fmt, b in summary["builds"].items():
            result["builds"][fmt] = {"seconds": b["build_seconds"], "splits": {
                s: {k: v for k, v in d.items() if k not in ("file", "errors")}
                for s, d in b["splits"].items()}}
            if fmt == "corpus":
                result["builds"][fmt]["docs_split_into_chunks"] = b["docs_split_into_chunks"]
        print("prepared", json.dumps(result["rows"]), file=sys.stderr)

        result["loader_batches_per_second"] = {}
        for stage in (1, 2, 3):
            it = pipeline.make_loader(config, stage, out, process_index=0, process_count=1)
            next(it)  # start-up
            start = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            rate = args.batches / (time.perf_counter() - start)
            result["loader_batches_per_second"][f"stage{stage}"] = round(rate, 1)
            print(f"stage {stage}: {rate:.1f} batches/s", file=sys.stderr)

        real = Path(tmp) / "real"
        b = tfds_build.build_dataset("stage1", {"train": REAL}, real, config)
        split = b["splits"]["train"]
        result["shared_real_stage1"] = {
            "seconds": b["build_seconds"], "vocab_size": b["tokenizer"]["vocab_size"],
            **{k: v for k, v in split.items() if k not in ("file", "errors")}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
