"""The latent channel on its own: can the generator copy a random document out of its latents?

    .venv/bin/python bench/channel.py [--config configs/demo.py:16x] [--start random|shipped|DIR]
        [--lengths 8,32,128] [--minutes 15] [--set train.mse_weight=0 ...]

Each document is N tokens drawn uniformly from a 200-token alphabet of the tokenizer's ordinary
pieces, so nothing but the latents can tell the generator what it holds (log2 200 = 7.6 bits a
token). It is compressed through the product's stage-1 path (`compress`: `<ENC> BOS doc EOS`
then the config's M memory tokens) and the generator is asked to reproduce it as a stage-1
paraphrase row (the real prompt framing, K = 1); the step is the product's stage-1 train step
(`make_train_step`, with the config's losses: set `--set train.mse_weight=0.1` to see the
MSE term's effect), every weight trained when starting from random init.

For each N it trains until held-out token accuracy (teacher-forced argmax over the N document
tokens of 256 documents never trained on) reaches 90% or `--minutes` run out, and reports the
steps and wall seconds to 50% and 90%, the final accuracy (also per document position), and
two collapse detectors of the held-out latents (flattened M x L per document): `shared` =
||mean over documents|| / rms ||latent|| (1 = every document gets the same vector, about
1/sqrt(256) = 0.06 for unrelated ones) and the mean pairwise cosine; with `model.span_head`,
also the head's accuracy on the framed documents (what the compressor wrote, read out by the
training-only head: `span_head_accuracy`). Prints one JSON object:
{config, start, memory_tokens, latent_width, overrides, runs: {N: {...}}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clara_jax.config import finalize, load_config_file  # noqa: E402
from clara_jax.data import prompts  # noqa: E402
from clara_jax.data.tokenizer import load_tokenizer  # noqa: E402
from clara_jax.model import (  # noqa: E402
    ModelConfig,
    compress,
    fit_optional_params,
    generate_logits,
    init_params,
    latent_span_logits,
)
from clara_jax.train.state import create_state  # noqa: E402
from clara_jax.train.steps import make_train_step  # noqa: E402

ALPHABET = 200
HELDOUT = 256
SHIPPED = "projects/demo/start_16x"
TARGETS = (0.5, 0.9)
# No questions in the copy task and every weight trains (as in the demo's stages 1-2); the
# learning rate warms up over 100 steps and then stays flat, since the run has no fixed length
# (the config's own schedule would decay, or warm up, over its train.steps). The losses and
# the optimizer are otherwise the config's.
COPY_OVERRIDES = ("train.schedule=constant", "train.steps=10000", "train.warmup_frac=0.01")


def alphabet_ids(tok, size: int = ALPHABET) -> np.ndarray:
    """`size` ordinary token ids (no special or memory token): int32[size]."""
    special = set(tok.special_ids)
    ids = [i for i in range(tok.vocab_size) if i not in special][:size]
    if len(ids) < size:
        raise ValueError(f"the tokenizer has {len(ids)} ordinary tokens, fewer than {size}")
    return np.asarray(ids, np.int32)


def copy_batch(tok, docs: np.ndarray, num_memory: int, doc_len: int
               ) -> dict[str, np.ndarray]:
    """Stage-1 rows that ask the generator to restate each document.

    docs: int32[B, N] -> the stage-1 batch contract (clara_jax.train.steps) with K = 1:
    doc_tokens/doc_mask [B, 1, doc_len] (framed, right-padded),
    tokens/mask/slot_mask/targets/loss_mask [B, T] and query fields unused by the copy task.
    """
    b, n = docs.shape
    question = tok.encode(prompts.PARAPHRASE_QUESTION)
    sep = tok.encode(prompts.ANSWER_SEPARATOR)
    length = prompts.FRAME_BUDGET + num_memory + 1 + len(question) + len(sep) + n + 1
    rows, doc_tokens, doc_mask = [], [], []
    for d in docs.tolist():
        framed, _ = prompts.frame_document(tok, d, n + prompts.DOC_FRAME)
        t, m = prompts.pad_to(framed, doc_len, tok.pad_id)
        doc_tokens.append(t)
        doc_mask.append(m)
        rows.append(prompts.generator_example_ids(
            tok, question, sep + d, 1, num_memory, length, len(question), n + len(sep) + 1
        ).arrays())
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["doc_tokens"] = np.stack(doc_tokens)[:, None]
    batch["doc_mask"] = np.stack(doc_mask)[:, None]
    batch["query_tokens"] = np.zeros((b, 1), np.int32)
    batch["query_mask"] = np.zeros((b, 1), bool)
    batch["pos_index"] = np.full((b,), -1, np.int32)
    return batch


def doc_positions(batch: dict, n: int) -> np.ndarray:
    """The target positions that hold the N document tokens (not the separator, not EOS):
    int32[B, N]."""
    first = np.argmax(batch["loss_mask"], axis=1)  # predicts the separator's first token
    lead = int(np.sum(batch["loss_mask"][0])) - n - 1
    return first[:, None] + lead + np.arange(n)[None]


def collapse_stats(latents) -> dict[str, float]:
    """latents: float[B, M, L] -> {shared, mean_cosine} over the B documents (see the module
    docstring)."""
    x = np.asarray(latents, np.float64).reshape(latents.shape[0], -1)
    shared = np.linalg.norm(x.mean(0)) / np.sqrt(np.mean(np.sum(x * x, axis=1)))
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cos = u @ u.T
    b = len(x)
    return {"shared": float(shared), "mean_cosine": float((cos.sum() - b) / (b * (b - 1)))}


def make_eval(cfg: ModelConfig):
    @jax.jit
    def evaluate(params, batch, positions):
        """-> (token accuracy of each document position float32[N], latents [B, M, L],
        the span head's accuracy on the framed document's tokens float32[], NaN without
        one)"""
        b, k, t = batch["doc_tokens"].shape
        docs, mask = batch["doc_tokens"].reshape(b * k, t), batch["doc_mask"].reshape(b * k, t)
        lat = compress(cfg, params, docs, mask)
        logits, _ = generate_logits(cfg, params, batch["tokens"], batch["mask"],
                                    batch["slot_mask"], lat.reshape(b, k, *lat.shape[1:]))
        pred = jnp.take_along_axis(jnp.argmax(logits, -1), positions, axis=1)
        gold = jnp.take_along_axis(batch["targets"], positions, axis=1)
        readout = jnp.float32(jnp.nan)
        if cfg.span_head_rate:
            guess = jnp.argmax(latent_span_logits(cfg, params, lat, cfg.span_head_rate), -1)
            hit = (guess.reshape(b * k, t) == docs) & mask
            readout = jnp.sum(hit) / jnp.sum(mask)
        return jnp.mean((pred == gold).astype(jnp.float32), axis=0), lat, readout
    return evaluate


def copy_config(config, n: int):
    """The config for documents of n tokens: the same M, with data.compression_rate (the text
    tokens one latent stands for) = ceil((n + 3) / M) and data.doc_max_len = M times that, so
    that an interleaved or spread layout sees the document's true rate."""
    config = config.copy_and_resolve_references()
    m = int(config.model.num_memory_tokens)
    rate = -(-(n + prompts.DOC_FRAME) // m)
    config.data.compression_rate = rate
    config.data.doc_max_len = rate * m
    config.data.chunk_overlap = 0  # one document, never chunked
    return finalize(config)


def run_length(config, params, tok, n: int, minutes: float, eval_every: int, seed: int,
               max_steps: int | None = None) -> dict:
    """Trains the copy task for documents of n tokens from `params` until 90% held-out token
    accuracy, `minutes` of wall time or `max_steps`; see the module docstring."""
    config = copy_config(config, n)
    cfg = ModelConfig.from_config(config)
    m = cfg.num_memory_tokens
    alphabet = alphabet_ids(tok)
    rng = np.random.default_rng(seed)
    td = int(config.data.doc_max_len)
    held = copy_batch(tok, alphabet[rng.integers(0, ALPHABET, (HELDOUT, n))], m, td)
    held_pos = doc_positions(held, n)
    held = jax.tree.map(jnp.asarray, held)
    params = fit_optional_params(cfg, params, seed)
    state = create_state(config, jax.tree.map(jnp.copy, params), stage=1, seed=seed)
    step = jax.jit(make_train_step(config, cfg, 1, params), donate_argnums=(0,))
    evaluate = make_eval(cfg)
    b = int(config.train.batch_size)
    curve, reached = [], {}
    start = time.perf_counter()
    train_seconds = 0.0
    i = 0
    while True:
        if i % eval_every == 0:
            by_position, lat, readout = evaluate(state.params, held, held_pos)
            acc = float(jnp.mean(by_position))
            stats = collapse_stats(lat)
            curve.append({"step": i, "seconds": round(train_seconds, 1), "token_accuracy":
                          round(acc, 4), **{k: round(v, 4) for k, v in stats.items()}})
            if cfg.span_head_rate:
                curve[-1]["span_head_accuracy"] = round(float(readout), 4)
            print(json.dumps({"n": n, **curve[-1]}), file=sys.stderr, flush=True)
            for target in TARGETS:
                if acc >= target and target not in reached:
                    reached[target] = {"steps": i, "seconds": round(train_seconds, 1)}
            if (acc >= TARGETS[-1] or time.perf_counter() - start > minutes * 60
                    or (max_steps is not None and i >= max_steps)):
                break
        t0 = time.perf_counter()
        batch = copy_batch(tok, alphabet[rng.integers(0, ALPHABET, (b, n))], m, td)
        state, metrics = step(state, batch, jax.random.key(i))
        if (i + 1) % eval_every == 0:
            jax.block_until_ready(metrics["loss"])
        train_seconds += time.perf_counter() - t0
        i += 1
    last = curve[-1]
    return {"doc_tokens": n, "compression": round(n / m, 2),
            "compression_rate": int(config.data.compression_rate), "steps": i,
            "train_seconds": round(train_seconds, 1),
            "final_token_accuracy": last["token_accuracy"], "shared": last["shared"],
            "mean_cosine": last["mean_cosine"],
            **({"span_head_accuracy": last["span_head_accuracy"]} if cfg.span_head_rate else {}),
            "accuracy_by_position": [round(float(a), 3) for a in by_position],
            **{f"to_{int(t * 100)}pct": reached.get(t) for t in TARGETS},
            "curve": curve}


def start_params(config, start: str, seed: int):
    """(params, tokenizer) for `--start`: random init with the shipped start's tokenizer, or
    a pretrained directory's params (`shipped` = the demo's 16x start, projects/demo/start_16x)."""
    from projects.demo.pretrain import PARAMS_FILE, TOKENIZER_DIR, find_pretrained, load_params

    cfg = ModelConfig.from_config(config)
    src = find_pretrained(SHIPPED if start in ("random", "shipped") else start)
    tok = load_tokenizer(src / TOKENIZER_DIR)
    if start == "random":
        return init_params(cfg, jax.random.key(seed)), tok
    return load_params(src / PARAMS_FILE, cfg), tok


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # M = 8 (16x), the channel the targets name; configs/demo.py itself runs at 4x.
    p.add_argument("--config", default=str(REPO / "configs/demo.py") + ":16x")
    p.add_argument("--start", default="random", help="random, shipped or a pretrained DIR")
    p.add_argument("--lengths", default="8,32,128")
    p.add_argument("--minutes", type=float, default=15.0, help="time budget per length")
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--max_steps", type=int, help="also stop each length after this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override, e.g. train.mse_weight=0.1 (repeatable)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if any(s.partition("=")[0] == "model.num_memory_tokens" for s in args.set):
        # finalize() would silently replace it (M = doc_max_len // compression_rate).
        p.error("--set model.num_memory_tokens: M is derived; set it with --set "
                "data.doc_max_len=M*RATE (data.doc_max_len=32 gives M=2 at the demo's rate 16)")
    overrides = ["train.lambda_retrieval=0", "train.train_base=true", *COPY_OVERRIDES,
                 *args.set]
    config = load_config_file(args.config, overrides)
    params, tok = start_params(config, args.start, args.seed)
    cfg = ModelConfig.from_config(config)
    runs = {}
    for n in [int(x) for x in args.lengths.split(",")]:
        runs[str(n)] = run_length(config, params, tok, n, args.minutes, args.eval_every,
                                  args.seed, args.max_steps)
    out = {"config": args.config, "start": args.start, "memory_tokens": cfg.num_memory_tokens,
           "latent_width": cfg.latent_width, "overrides": overrides,
           "backend": jax.default_backend(), "runs": runs}
    text = json.dumps(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
