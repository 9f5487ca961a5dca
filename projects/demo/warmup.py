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
embeddings and latent projections keep their initial values. It runs through the training
loop (`clara_jax.train.loop.run`) with the stages' step (`make_train_step` with the
next-token loss `lm_loss` and the base alone trainable) and optimizer (`make_optimizer`, set
up by `warmup_config`). The result is a stage-1 train state at step 0, saved like any
checkpoint, so `clara train --init_from=DIR` starts from it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np

from clara_jax import losses
from clara_jax.config import check_base_trainable
from clara_jax.data import prompts
from clara_jax.data.tokenizer import Tokenizer
from clara_jax.fileio import atomic_write_json
from clara_jax.model import ModelConfig, forward_logits, init_params
from clara_jax.train import checkpoint as ckpt
from clara_jax.train.loop import Hook, Loop, Reporter, run
from clara_jax.train.state import create_state
from clara_jax.train.steps import make_train_step

BUCKET = 32  # batches are cut to their longest row, rounded up to this (few compilations)
BASE = frozenset({"base"})  # what the warm-up trains: the base decoder alone


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


def batch_of(tokens: np.ndarray, lengths: np.ndarray, idx: np.ndarray) -> dict:
    """Rows `idx` of `pack_rows` output, cut to their longest row rounded up to BUCKET:
    {"tokens": int32[B, W], "mask": bool[B, W]} (mask: the row's real tokens)."""
    width = min(tokens.shape[1], -(-int(lengths[idx].max()) // BUCKET) * BUCKET)
    return {"tokens": tokens[idx, :width],
            "mask": np.arange(width)[None] < lengths[idx][:, None]}


class LMBatches:
    """Endless batches of `batch_size` token rows (`batch_of`): `epoch_rows()` gives an epoch's
    rows (the same ones each time, or a fresh world's), shuffled by a seeded generator
    (`seed`, then `seed + batches drawn` for each later epoch); `epochs` counts them."""

    def __init__(self, epoch_rows: Callable[[], list[list[int]]], pad_id: int,
                 batch_size: int, seed: int):
        self.epoch_rows, self.pad_id, self.batch_size, self.seed = (
            epoch_rows, pad_id, batch_size, seed)
        self.drawn, self.epochs = 0, 0
        self._new_epoch(np.random.default_rng(seed))

    def _new_epoch(self, rng) -> None:
        self.tokens, self.lengths = pack_rows(self.epoch_rows(), self.pad_id)
        self.order, self.start = rng.permutation(len(self.tokens)), 0
        self.epochs += 1

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.start + self.batch_size > len(self.order):
            self._new_epoch(np.random.default_rng(self.seed + self.drawn))
        idx = self.order[self.start:self.start + self.batch_size]
        self.start += self.batch_size
        self.drawn += 1
        return batch_of(self.tokens, self.lengths, idx)


def warmup_config(config: ml_collections.ConfigDict, steps: int, learning_rate: float
                  ) -> ml_collections.ConfigDict:
    """`config` with the warm-up's optimizer settings for `make_optimizer`: AdamW (0.9, 0.95,
    weight decay 0.01) after a global-norm clip of 1.0, warmup-cosine to 0.1x of
    `learning_rate` with 10% warm-up, over `steps`."""
    c = ml_collections.ConfigDict(config.to_dict())
    t = c.train
    t.steps, t.learning_rate = int(steps), float(learning_rate)
    t.schedule, t.grad_accum = "cosine", 1
    t.warmup_frac, t.min_lr_ratio, t.grad_clip = 0.1, 0.1, 1.0
    t.adam_b1, t.adam_b2, t.weight_decay = 0.9, 0.95, 0.01
    return c


def lm_loss(cfg: ModelConfig):
    """loss(params, batch, rng) -> (loss, metrics): next-token CE (`losses.token_cross_entropy`)
    of the plain decoder over each row's real tokens; batch tokens int32[B, T], mask bool[B, T].
    No dropout (the adapters are not on the path)."""

    def loss(params, batch, rng):
        del rng
        logits = forward_logits(cfg, params, batch["tokens"])[:, :-1]
        ce, n = losses.token_cross_entropy(logits, batch["tokens"][:, 1:], batch["mask"][:, 1:])
        return ce, {"loss": ce, "target_tokens": n}

    return loss


def make_lm_step(config: ml_collections.ConfigDict, cfg: ModelConfig, params_like):
    """The warm-up's step for `run`: (state, batch, rng key data) -> (state, metrics), jitted
    (one compilation per BUCKET width), the state donated; the base alone trains."""
    step = make_train_step(config, cfg, 1, params_like, loss_fn=lm_loss, groups=BASE)
    return jax.jit(lambda state, batch, rng: step(state, batch, jax.random.wrap_key_data(rng)),
                   donate_argnums=(0,))


def lm_state(config: ml_collections.ConfigDict, params):
    """A step-0 train state over `params` whose optimizer trains the base alone."""
    return create_state(config, params, 1, groups=BASE)


class Losses(Hook):
    """Collects every step's loss (device scalars, fetched once by `values()`)."""

    def __init__(self):
        self._losses = []

    def after(self, step, state, metrics, stop, fetched) -> None:
        self._losses.append(metrics["loss"])

    def values(self) -> list[float]:
        return [float(x) for x in jax.device_get(self._losses)]


def lm_loop(config: ml_collections.ConfigDict, cfg: ModelConfig, params_like,
            batches, name: str, progress: bool, hooks=()) -> Loop:
    """The warm-up's `Loop` over `batches` for config.train.steps steps (`warmup_config`)."""
    t = config.train
    steps = int(t.steps)
    return Loop(step_fn=make_lm_step(config, cfg, params_like), batches=batches,
                stop=lambda step: "done" if step >= steps else None,
                report=Reporter(None, name, steps, int(t.log_every), progress=progress),
                fetch=lambda step: step % int(t.log_every) == 0,
                nan_policy=str(t.nan_policy), hooks=hooks)


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
    `warmup_rows` (batch config.train.batch_size; optimizer: `warmup_config`) and saves it at
    `out` as a stage-1 state at step 0. Returns {"steps", "first_loss", "last_loss",
    "wall_s"}; an existing finished warm-up at `out` is reused."""
    out = Path(out)
    done = out / "warmup.json"
    if done.exists():
        return json.loads(done.read_text())
    check_base_trainable(config)  # before the steps, not when the state is saved after them
    c = warmup_config(config, steps, learning_rate)
    cfg = ModelConfig.from_config(c)
    d, seed = c.data, int(c.train.seed)
    rows = warmup_rows(data_dir, tok, int(d.doc_max_len), int(d.question_max_len))
    params = init_params(cfg, jax.random.key(seed))
    t0, collected = time.perf_counter(), Losses()
    if steps > 0:
        batches = LMBatches(lambda: rows, tok.pad_id, int(c.train.batch_size), seed)
        loop = lm_loop(c, cfg, params, batches, "lm warm-up", progress, hooks=(collected,))
        params = run(lm_state(c, params), 0, loop)[0].params
    save_start_state(config, params, out, {"warmup_steps": steps})
    got = collected.values()
    summary = {"steps": steps, "first_loss": got[0] if got else None,
               "last_loss": float(np.mean(got[-10:])) if got else None,
               "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_json(done, summary)
    return summary
