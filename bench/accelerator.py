"""Accelerator benchmark: train-step MFU, generation tokens/s by batch, latent vs text RAG time.

    .venv/bin/python bench/accelerator.py --size 1b            # on a lent H100 / H200
    .venv/bin/python bench/accelerator.py --size tiny --steps 2 --batches 1,2   # CPU check

One process, random weights and synthetic batches (speed, not quality; nothing downloads),
sized to finish within --minutes (default 8) on one H100/H200. The last stdout line is one
JSON object with three sections:

- `train`: the stage's compiled train step (`bench/train_step.py`'s StepBench: the same
  `make_train_step` + `compile_train_step` as `clara train`, full-length random-token batches)
  in bfloat16 compute, timed over --steps steps after two warm-up steps (median).
  `flops_per_step` is the analytic count of bench/train_step.py (`model_flops_per_step`: the
  method's matmuls, a frozen weight's backward at 1x its forward, a trained one's at 2x; no
  rematerialisation), named in `flops_source`. XLA's count of the compiled step
  (`compiled.cost_analysis()`) is `xla_flops_per_step`; with `model.scan_layers` XLA counts
  the scanned layer body once, so it is not used for MFU. `mfu` = achieved FLOP/s / (devices
  x `peak_tflops_per_chip`), the peak from --peak_tflops or the dense bfloat16 table below by
  `jax.devices()[0].device_kind`; null where neither knows one (CPU), achieved TFLOP/s still
  reported.
- `generate`: the library's jitted KV-cache generator (`Generator`, EOS disabled) in latent
  mode at each --batches size: tokens/s of whole answers of --new_tokens tokens (prefill
  included) and of the decode loop alone (bench/generate.py's `throughput_by_batch`), on
  the RAG prompts of the next section.
- `rag`: the RAG pipeline (`RagPipeline.run`: query encoding, exact search of a latent index,
  generation, decoding) answering the same --questions questions in one batch with the K =
  data.num_docs retrieved documents' latents (`latent`) and with their text (`text`), modes
  alternated, --repeats times after a compiling run (medians). The index holds --docs
  documents of the bundled world, packed to the text room of data.doc_max_len tokens, built
  with this model's compressor; the tokenizer is the world's SentencePiece model. Answers stop
  at EOS (`answer_tokens_mean` says how long they ran).

Sizes: `tiny` is configs/tiny.py (the test suite's model, for CPU); `1b` is
configs/mistral_7b.py (frozen bfloat16 base, LoRA r16 on every projection, 256-token
documents at 16x, K = 5, scanned layers) narrowed to D=2048, 18 layers, 16:8 heads of 128,
F=5632, vocab 32000: 1.01B parameters (0.98B base), `model.remat="projections"`, batch 16.
--set adds config overrides. Stage 2 (instruction tuning, the base frozen) by default.

The budget guard: step timing stops at 40% of --minutes, batch sizes not started by 70% are
left out, and the RAG section is skipped past 75%; `skipped` lists what was left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.generate import batches, throughput_by_batch  # noqa: E402
from bench.train_step import StepBench, _timed, load_config  # noqa: E402
from clara_jax.aot import by_device_kind  # noqa: E402
from clara_jax.data import prompts, world  # noqa: E402
from clara_jax.data.prepare import world_tokenizer  # noqa: E402
from clara_jax.index import build_index, model_identity, open_index  # noqa: E402
from clara_jax.index.corpus import make_tokenize  # noqa: E402
from clara_jax.infer.rag import RagPipeline, RagSettings  # noqa: E402
from clara_jax.model import count_params  # noqa: E402

ONE_B = ("model.dim=2048", "model.n_layers=18", "model.n_heads=16", "model.n_kv_heads=8",
         "model.head_dim=128", "model.mlp_dim=5632", "model.vocab_size=32000",
         "model.max_len=4096", "model.remat=projections", "train.batch_size=16")
# size -> (config file, overrides, default --batches, --new_tokens, --docs)
SIZES = {
    "tiny": ("configs/tiny.py", ("model.dtype=bfloat16",), "1,4", 8, 8),
    "1b": ("configs/mistral_7b.py", ONE_B + ("model.dtype=bfloat16",), "1,8,32,128", 64, 64),
}
# Dense (no sparsity) bfloat16 TFLOP/s per chip, matched against the lower-cased device_kind,
# most specific first (vendor data sheets: H100/H200 SXM 989.4, H100 PCIe 756, H100 NVL 835).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.4), ("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h100", 989.4),
    ("h800", 989.4), ("a100", 312.0),
    ("tpu v5 lite", 197.0), ("tpu v5e", 197.0), ("tpu v5p", 459.0), ("tpu v5", 459.0),
    ("tpu v6 lite", 918.0), ("tpu v6e", 918.0), ("tpu v4", 275.0),
)
FLOPS_SOURCE = ("analytic (bench/train_step.py model_flops_per_step: 2 x tokens x weights per "
                "forward pass plus attention's S^2 terms; backward 1x forward for frozen, 2x "
                "for trained weights; remat not counted)")


class Budget:
    def __init__(self, minutes: float):
        self.start, self.seconds = time.perf_counter(), 60.0 * minutes
        self.skipped: list[str] = []
        self.sections: dict[str, float] = {}

    def at(self, share: float) -> float:
        """The perf_counter time at `share` of the budget."""
        return self.start + share * self.seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def lap(self, name: str) -> None:
        """Records the seconds since the previous lap (or the start) as section `name`."""
        now = self.elapsed()
        self.sections[name] = round(now - sum(self.sections.values()), 1)
        print(f"[{now:.0f}s] {name} done", file=sys.stderr)


def peak_tflops(device, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return float(override), "--peak_tflops"
    peak = by_device_kind(device, PEAK_BF16_TFLOPS)
    if peak is not None:
        return peak, f"table ({device.device_kind}, dense bfloat16)"
    return None, f"unknown for device kind {device.device_kind!r} (pass --peak_tflops)"


def train_section(config, stage: int, steps: int, override, budget: Budget):
    """(the JSON section, the model config, the params after the timed steps)."""
    bench = StepBench(config, stage)
    print(f"train step compiled in {bench.compile_s:.1f}s", file=sys.stderr)
    for _ in range(2):
        bench.run()
    times = []
    for _ in range(steps):
        times.append(_timed(bench.run)[0])
        if time.perf_counter() > budget.at(0.4):
            budget.skipped.append(f"train: timed {len(times)} of {steps} steps")
            break
    step_s = statistics.median(times)
    devices = jax.devices()
    peak, source = peak_tflops(devices[0], override)
    achieved = bench.model_flops / step_s
    cfg = bench.cfg
    out = {
        "stage": stage, "batch_size": int(config.train.batch_size),
        "compute_dtype": str(np.dtype(cfg.compute_dtype)), "remat": str(config.model.remat),
        "scan_layers": bool(config.model.scan_layers), "compile_s": round(bench.compile_s, 2),
        "steps_timed": len(times), "step_s": step_s, "tokens_per_step": bench.tokens,
        "tokens_per_s": bench.tokens / step_s,
        "flops_per_step": bench.model_flops, "flops_source": FLOPS_SOURCE,
        "xla_flops_per_step": bench.xla_flops,
        "achieved_tflops": achieved / 1e12, "peak_tflops_per_chip": peak, "peak_source": source,
        "mfu": None if peak is None else achieved / (peak * 1e12 * len(devices)),
        "loss": float(bench.metrics["loss"]),
    }
    return out, cfg, bench.state.params


def packed_docs(tok, texts: list[str], room: int, n: int) -> list[dict]:
    """n records of consecutive world documents joined until each has about `room` tokens
    (cycling through the world when it runs out)."""
    records, parts, length, i = [], [], 0, 0
    while len(records) < n:
        text = texts[i % len(texts)]
        parts.append(text)
        length += len(tok.encode(text)) + 1
        i += 1
        if length >= room:
            records.append({"id": f"doc{len(records)}", "title": "", "text": " ".join(parts)})
            parts, length = [], 0
    return records


def rag_pipeline(config, cfg, params, n_docs: int, n_questions: int, workdir: Path):
    """(a RagPipeline over a fresh index of `n_docs` packed world documents, its questions)."""
    tok = world_tokenizer(config)
    w = world.make_world(0, "small", "train")
    room = prompts.text_doc_room(int(config.data.doc_max_len))
    records = packed_docs(tok, list(w.docs.values()), room, n_docs)
    identity = model_identity(cfg, params)  # hashes the compressor once, for build and open
    build_index(workdir / "index", cfg, params, records,
                make_tokenize(tok, int(config.data.doc_max_len)), scann=False,
                batch_size=min(64, n_docs), identity=identity)
    index = open_index(workdir / "index", identity=identity)
    questions = [q.question for q in w.questions][:n_questions]
    settings = RagSettings(num_docs=int(config.data.num_docs),
                           max_new_tokens=int(config.data.answer_max_len),
                           batch_size=len(questions), backend="exact")
    return RagPipeline(config, cfg, params, tok, index, settings), questions


def rag_section(pipe: RagPipeline, questions: list[str], repeats: int) -> dict:
    k = pipe.settings.num_docs
    modes = ("latent", "text")
    for mode in modes:  # compiles the query encoder and each mode's generator bucket
        pipe.run(questions, mode, k)
    runs = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode in modes:
            t = time.perf_counter()
            batch = pipe.run(questions, mode, k)
            runs[mode].append((1e3 * (time.perf_counter() - t), batch))
    out = {"questions": len(questions), "num_docs": k,
           "answer_max_tokens": pipe.settings.max_new_tokens}
    for mode in modes:
        batch = runs[mode][-1][1]
        ids = [row[:k] for row in batch.ids]
        texts = pipe.doc_texts(batch.res, k) if mode == "text" else None
        toks, _ = pipe.prompts(questions, ids, mode, texts)
        ms = statistics.median(t for t, _ in runs[mode])
        out[mode] = {
            "ms_per_batch": round(ms, 2), "ms_per_question": round(ms / len(questions), 3),
            "stage_ms": {s: round(statistics.median(b.ms[s] for _, b in runs[mode]), 2)
                         for s in batch.ms},
            "prompt_tokens_mean": float(np.mean([len(t) for t in toks])),
            "answer_tokens_mean": float(np.mean(batch.gen.lengths)),
        }
    out["latent_vs_text_speedup"] = round(out["text"]["ms_per_batch"]
                                          / out["latent"]["ms_per_batch"], 3)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--stage", type=int, choices=(1, 2, 3), default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed train steps")
    ap.add_argument("--batches", default=None, help="generation batch sizes (default by size)")
    ap.add_argument("--new_tokens", type=int, default=None, help="tokens per generated answer")
    ap.add_argument("--questions", type=int, default=8, help="RAG questions in one batch")
    ap.add_argument("--docs", type=int, default=None, help="documents in the RAG index")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget")
    ap.add_argument("--peak_tflops", type=float, default=None,
                    help="per-chip peak (default: the bfloat16 table by device kind)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides: model.n_layers=8")
    args = ap.parse_args(argv)
    budget = Budget(args.minutes)
    path, overrides, default_batches, new_tokens, n_docs = SIZES[args.size]
    overrides = [*overrides, f"train.stage={args.stage}", "train.train_base=false", *args.set]
    config = load_config(path, overrides)
    device = jax.devices()[0]
    out = {"size": args.size, "config": path, "overrides": overrides,
           "platform": device.platform, "device_kind": device.device_kind,
           "devices": jax.device_count(), "jax": jax.__version__}

    train, cfg, params = train_section(config, args.stage, args.steps, args.peak_tflops, budget)
    counts = count_params(params)
    out.update(params=counts, param_count=counts["total"], train=train)
    budget.lap("train")
    print(f"{args.size}: {counts['total']:,} params, step {train['step_s']:.3f}s, "
          f"{train['achieved_tflops']:.2f} TFLOP/s, MFU {train['mfu']}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="clara_accel_") as tmp:
        pipe, questions = rag_pipeline(config, cfg, params, args.docs or n_docs,
                                       args.questions, Path(tmp))
        budget.lap("rag_setup")
        k = pipe.settings.num_docs
        res = pipe.retrieve(questions, k)
        toks, slots = pipe.prompts(questions, [row[:k] for row in res.ids], "latent")
        rows = list(zip(toks, slots, pipe.doc_latents(res, k)))
        n = args.new_tokens or new_tokens
        by_batch, decode = throughput_by_batch(cfg, params, rows,
                                               batches(args.batches or default_batches), n,
                                               args.repeats, deadline=budget.at(0.7))
        asked = batches(args.batches or default_batches)
        if len(by_batch) < len(asked):
            budget.skipped.append(f"generate: batches {asked[len(by_batch):]}")
        out["generate"] = {"new_tokens": n, "prompt_tokens": max(len(t) for t in toks),
                           "tokens_per_s_by_batch": by_batch,
                           "decode_tokens_per_s_by_batch": decode}
        budget.lap("generate")
        if time.perf_counter() > budget.at(0.75):
            budget.skipped.append("rag")
            out["rag"] = None
        else:
            out["rag"] = rag_section(pipe, questions, args.repeats)
            budget.lap("rag")
    out.update(elapsed_s=round(budget.elapsed(), 1), budget_s=budget.seconds,
               section_s=budget.sections, skipped=budget.skipped)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
