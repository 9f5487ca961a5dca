"""Language-model warm-up of a from-scratch base decoder, before stage 1.

CLaRa starts from a pretrained LLM that already reads text in its context. A small decoder
trained from scratch (configs/demo.py) does not, and then stage 1 never learns to read the
latents either: its generator answers from the question alone, and the compressor's latents
of different documents stay almost identical (cosine 0.9996 on the medium world). A few
hundred next-token steps on the train world's text fix that start: the train documents, and
each stage-1 question answered from its document's text in the text-RAG prompt framing
(`prompts.text_rag_prompt`). On the medium world, stage 1 from such a warm-up reads its
latents (held-out answer CE 0.155 nats lower with the right document's latents than with
another's; 0.000 without the warm-up) and latents of different documents are no longer
collinear (cosine 0.71).

Only the base decoder trains (embeddings, blocks, norms, unembedding); the adapters, memory
embeddings and latent projections keep their initial values. The result is a stage-1 train
state at step 0, saved like any checkpoint, so `clara train --init_from=DIR` starts from it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from clara_jax.config import check_base_trainable
from clara_jax.data import prompts
from clara_jax.data.tokenizer import Tokenizer
from clara_jax.fileio import atomic_write_json
from clara_jax.model import ModelConfig, forward_logits, init_params, param_group
from clara_jax.train import checkpoint as ckpt
from clara_jax.train.state import create_state

BUCKET = 32  # batches are cut to their longest row, rounded up to this (few compilations)


def warmup_rows(data_dir, tok: Tokenizer, doc_max_len: int, question_max_len: int
                ) -> list[list[int]]:
    """Token rows of the train world: `BOS document EOS` per document of corpus.jsonl and, per
    question of stage1.jsonl's "qa" rows, its document's text-RAG prompt + ` answer EOS`."""
    train = Path(data_dir) / "train"
    rows = []
    with open(train / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                text = json.loads(line)["text"]
                rows.append([tok.bos_id] + tok.encode(text)[:doc_max_len] + [tok.eos_id])
    with open(train / "stage1.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line) if line.strip() else {}
            if row.get("data_type") != "qa":
                continue
            for question, answer in zip(row["question"], row["answers"]):
                prompt = prompts.text_rag_prompt(tok, question, row["docs"], doc_max_len,
                                                 question_max_len)
                rows.append(prompt.tolist() + tok.encode(prompts.ANSWER_SEPARATOR + answer)
                            + [tok.eos_id])
    if not rows:
        raise ValueError(f"{train}: no documents or QA rows to warm up on")
    return rows


def pack_rows(rows: list[list[int]], pad_id: int, width: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32[R, W], lengths int32[R]) right-padded (or cut) to `width`, by default
    the longest row."""
    width = width or max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r[:width]
    return tokens, np.asarray([min(len(r), width) for r in rows], np.int32)


def batch_of(tokens: np.ndarray, lengths: np.ndarray, idx: np.ndarray
             ) -> tuple[jax.Array, jax.Array]:
    """Rows `idx` of `pack_rows` output, cut to their longest row rounded up to BUCKET:
    (tokens int32[B, W], lengths int32[B])."""
    width = min(tokens.shape[1], -(-int(lengths[idx].max()) // BUCKET) * BUCKET)
    return jnp.asarray(tokens[idx, :width]), jnp.asarray(lengths[idx])


def warmup_optimizer(decoder, steps: int, learning_rate: float) -> optax.GradientTransformation:
    """AdamW (0.9, 0.95, weight decay 0.01) after a global-norm clip of 1.0, warmup-cosine to
    0.1x with 10% warm-up, on the base weights of `decoder`; its adapters stay as they are."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 10), max(steps, 2), learning_rate * 0.1)
    return optax.multi_transform(
        {"base": optax.chain(optax.clip_by_global_norm(1.0),
                             optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.01)),
         "frozen": optax.set_to_zero()}, _labels(decoder))


def make_warmup_step(cfg: ModelConfig, tx: optax.GradientTransformation):
    """step(decoder, opt_state, rest, tokens int32[B, T], lengths int32[B]) -> (decoder,
    opt_state, loss float32[]): next-token CE over each row's real tokens."""

    def loss_fn(decoder, rest, tokens, lengths):
        logits = forward_logits(cfg, {**rest, "decoder": decoder}, tokens)[:, :-1]
        targets = tokens[:, 1:]
        weight = (jnp.arange(targets.shape[1])[None] < (lengths[:, None] - 1)).astype(
            jnp.float32)
        logz = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum((logz - picked) * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    @jax.jit
    def step(decoder, opt_state, rest, tokens, lengths):
        loss, grads = jax.value_and_grad(loss_fn)(decoder, rest, tokens, lengths)
        updates, opt_state = tx.update(grads, opt_state, decoder)
        return optax.apply_updates(decoder, updates), opt_state, loss

    return step


def _labels(decoder):
    """'base' for the base weights of `decoder`, 'frozen' for its adapters."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "base" if param_group(path) == "base" else "frozen", decoder)


def save_start_state(config: ml_collections.ConfigDict, params, out, meta: dict) -> None:
    """Saves `params` at `out` as a stage-1 train state at step 0 (base trainable), the form
    `clara train --init_from=DIR` starts from; `meta` joins the checkpoint's metadata."""
    stage1 = ml_collections.ConfigDict(config.to_dict())
    stage1.train.stage, stage1.train.train_base = 1, True
    state = create_state(stage1, params, 1)
    manager = ckpt.make_manager(out, async_save=False)
    ckpt.save(manager, state, {}, {"stage": 1, "train_base": True, "step": 0,
                                   "config": stage1.to_json(), **meta})
    manager.wait_until_finished()
    manager.close()


def lm_warmup(config: ml_collections.ConfigDict, data_dir, out, tok: Tokenizer, steps: int,
              learning_rate: float, progress: bool = True) -> dict:
    """Trains the base decoder of a fresh `init_params` for `steps` next-token steps on
    `warmup_rows` (batch config.train.batch_size, warmup-cosine to 0.1x, clip 1.0) and saves
    it at `out` as a stage-1 state at step 0. Returns {"steps", "first_loss", "last_loss",
    "wall_s"}; an existing finished warm-up at `out` is reused."""
    out = Path(out)
    done = out / "warmup.json"
    if done.exists():
        return json.loads(done.read_text())
    check_base_trainable(config)  # before the steps, not when the state is saved after them
    cfg = ModelConfig.from_config(config)
    d = config.data
    tokens, lengths = pack_rows(warmup_rows(data_dir, tok, int(d.doc_max_len),
                                            int(d.question_max_len)), tok.pad_id)
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(int(config.train.seed)))
    decoder, rest = params["decoder"], {k: v for k, v in params.items() if k != "decoder"}
    tx = warmup_optimizer(decoder, steps, learning_rate)
    opt_state = tx.init(decoder)
    step = make_warmup_step(cfg, tx)
    batch = int(config.train.batch_size)
    order = np.random.default_rng(int(config.train.seed)).permutation(len(tokens))
    losses, start, t0 = [], 0, time.perf_counter()
    bar = tqdm(range(steps), desc="lm warm-up", disable=not progress, unit="step")
    for i in bar:
        if start + batch > len(order):
            order, start = np.random.default_rng(int(config.train.seed) + i).permutation(
                len(tokens)), 0
        idx = order[start:start + batch]
        start += batch
        decoder, opt_state, loss = step(decoder, opt_state, rest,
                                        *batch_of(tokens, lengths, idx))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    save_start_state(config, {**rest, "decoder": decoder}, out, {"warmup_steps": steps})
    summary = {"steps": steps, "first_loss": losses[0] if losses else None,
               "last_loss": float(np.mean(losses[-10:])) if losses else None,
               "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_json(done, summary)
    return summary
