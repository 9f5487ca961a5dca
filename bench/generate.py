"""Generation benchmark on a random-weight model. The last output line is one JSON object.

- cached vs recompute: greedy decoding of --new_tokens (256) tokens with the KV-cached loop and
  with full recomputation of the sequence every step (both jitted, compiled before timing).
- latent vs text answers: the same decoder weights answer from K=5 documents of 256 tokens,
  either as 16x-compressed latents (K*M slots in the prompt) or as their text in the prompt;
  ms per answer (--answer_tokens new tokens, batch 1) and time to first token, side by side.
- tokens_per_s_by_batch: cached latent-mode generation of 64-token answers at batch sizes 1, 8,
  32 (prefill included); decode_tokens_per_s_by_batch: the decode loop alone.

  .venv/bin/python bench/generate.py                 # configs/demo.py widths
  .venv/bin/python bench/generate.py --size=mid      # a wider, deeper random model

Documents are compressed once before timing (in serving they come precomputed from the index).
Prompt length buckets are set to each mode's exact prompt length, so neither mode pays for
bucket padding. EOS is disabled so every answer has the same length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clara_jax.infer import Generator  # noqa: E402
from clara_jax.model import ModelConfig, compress, init_params  # noqa: E402

SIZES = {
    # configs/demo.py widths, 256-token documents at 16x.
    "demo": dict(),
    "mid": dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64,
                mlp_dim=1408),
}


def model_config(size: str, doc_len: int, compression: int) -> ModelConfig:
    from configs import demo

    config = demo.get_config()
    for k, v in SIZES[size].items():
        config.model[k] = v
    config.model.max_len = 4096
    config.data.doc_max_len = doc_len
    config.data.compression_rate = compression
    from clara_jax.config import finalize

    return ModelConfig.from_config(finalize(config))


def timed(fn, repeats: int) -> float:
    """Median wall seconds of fn() over `repeats` runs, after one warm-up (compile) run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batches(spec: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]."""
    return [int(x) for x in spec.split(",") if x.strip()]


def throughput_by_batch(cfg, params, rows, sizes, tokens: int, repeats: int, deadline=None
                        ) -> tuple[dict, dict]:
    """Cached latent-mode generation by batch size: (tokens/s of whole answers of `tokens`
    tokens, prefill included; tokens/s of the decode loop alone, the time of `tokens` tokens
    minus that of prefill + 1 token), each {str(batch): value}. rows: (prompt ids, slot flags,
    latents float[K, M, L]) cycled to fill each batch; EOS disabled, the length bucket the
    longest prompt; a decode rate is None where the two times leave no decode time. deadline
    (a perf_counter time): batch sizes not started by then are left out."""
    by_batch, decode_by_batch = {}, {}
    length = max(len(r[0]) for r in rows)
    for b in sizes:
        if deadline is not None and by_batch and time.perf_counter() > deadline:
            break
        chosen = [rows[i % len(rows)] for i in range(b)]
        toks, slots = [r[0] for r in chosen], [r[1] for r in chosen]
        lats = np.stack([r[2] for r in chosen])
        secs = {}
        for n in (tokens, 1):
            gen = Generator(cfg, params, eos_id=-1, max_new_tokens=n,
                            length_buckets=(length,), batch_buckets=(b,))
            secs[n] = timed(lambda gen=gen, toks=toks, slots=slots, lats=lats: gen(
                toks, slots=slots, latents=lats), repeats)
        by_batch[str(b)] = round(b * tokens / secs[tokens], 1)
        # null where timing noise leaves no decode time (a loaded machine, a tiny model)
        decode = secs[tokens] - secs[1]
        decode_by_batch[str(b)] = round(b * (tokens - 1) / decode, 1) if decode > 0 else None
        print(f"batch {b}: {b * tokens} tokens in {secs[tokens]:.3f}s, prefill + 1 token "
              f"{secs[1]:.3f}s", file=sys.stderr)
    return by_batch, decode_by_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="demo")
    ap.add_argument("--num_docs", type=int, default=5)
    ap.add_argument("--doc_len", type=int, default=256)
    ap.add_argument("--compression", type=int, default=16)
    ap.add_argument("--question_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--answer_tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    cfg = model_config(args.size, args.doc_len, args.compression)
    k, m = args.num_docs, cfg.num_memory_tokens
    params = init_params(cfg, jax.random.key(0))
    rs = np.random.RandomState(0)
    v = cfg.vocab_size

    def question():
        return list(rs.randint(3, v, size=args.question_len))

    # Latent prompt: BOS + K x (M slots + SEP) + question, as the generator prompt lays it out.
    def latent_prompt():
        toks, slots = [2], [False]
        for _ in range(k):
            toks += [0] * m + [4]
            slots += [True] * m + [False]
        q = question()
        return toks + q, slots + [False] * len(q)

    docs = rs.randint(3, v, size=(k, args.doc_len)).astype(np.int32)
    text_prompt = [2] + [int(t) for d in docs for t in d] + question()
    lat = jax.jit(lambda p, d: compress(cfg, p, d, jnp.ones(d.shape, bool)))(params, docs)
    lat = np.asarray(lat)[None]  # [1, K, M, L]
    lp, ls = latent_prompt()
    print(f"model {args.size}: D={cfg.dim} layers={cfg.n_layers} V={cfg.vocab_size}; latent "
          f"prompt {len(lp)} tokens ({k}x{m} slots), text prompt {len(text_prompt)} tokens",
          file=sys.stderr)

    out = {"device": jax.devices()[0].device_kind, "size": args.size, "dim": cfg.dim,
           "n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size, "num_docs": k,
           "doc_len": args.doc_len, "compression": args.compression,
           "latent_prompt_tokens": len(lp), "text_prompt_tokens": len(text_prompt)}

    # 1. Cached vs recomputed decoding, batch 1, latent prompt, new_tokens greedy tokens.
    n = args.new_tokens
    kw = dict(eos_id=-1, max_new_tokens=n, length_buckets=(len(lp),), batch_buckets=(1,))
    for name, use_cache in (("cached", True), ("recompute", False)):
        gen = Generator(cfg, params, use_cache=use_cache, **kw)
        secs = timed(lambda gen=gen: gen([lp], slots=[ls], latents=lat), args.repeats)
        out[f"{name}_tokens_per_s"] = round(n / secs, 1)
        print(f"{name}: {n} tokens in {secs:.3f}s", file=sys.stderr)
    out["cached_vs_recompute_speedup"] = round(
        out["cached_tokens_per_s"] / out["recompute_tokens_per_s"], 2)

    # 2. Latent vs text answers, batch 1, same weights, alternating so load drifts hit both.
    gens = {}
    for mode, length in (("latent", len(lp)), ("text", len(text_prompt))):
        for what, tokens in (("answer", args.answer_tokens), ("ttft", 1)):
            gens[mode, what] = Generator(cfg, params, eos_id=-1, max_new_tokens=tokens,
                                         length_buckets=(length,), batch_buckets=(1,))

    def run(mode, what):
        if mode == "latent":
            return gens[mode, what]([lp], slots=[ls], latents=lat)
        return gens[mode, what]([text_prompt])

    results = {key: [] for key in gens}
    for key in gens:
        run(*key)  # compile
    for _ in range(args.repeats):
        for key in gens:
            start = time.perf_counter()
            run(*key)
            results[key].append(time.perf_counter() - start)
    for (mode, what), times in results.items():
        name = f"{mode}_ms_per_answer" if what == "answer" else f"{mode}_ttft_ms"
        out[name] = round(1000 * statistics.median(times), 2)
    out["answer_tokens"] = args.answer_tokens
    out["latent_vs_text_answer_speedup"] = round(
        out["text_ms_per_answer"] / out["latent_ms_per_answer"], 2)
    out["latent_vs_text_ttft_speedup"] = round(out["text_ttft_ms"] / out["latent_ttft_ms"], 2)

    # 3. Cached latent-mode throughput by batch size.
    tokens = 64
    rows = [latent_prompt() + (lat[0],) for _ in range(max(batches(args.batches)))]
    by_batch, decode_by_batch = throughput_by_batch(cfg, params, rows, batches(args.batches),
                                                    tokens, args.repeats)
    out["tokens_per_s_by_batch"] = by_batch
    out["decode_tokens_per_s_by_batch"] = decode_by_batch
    out["tokens_per_s_by_batch_new_tokens"] = tokens
    print(json.dumps(out))


if __name__ == "__main__":
    main()
