"""Probe: which half of the channel is slow, the compressor writing or the generator reading?

`bench/channel.py` trains both halves at once; here each half trains against a fixed partner:

- `encoder`: `compress` of the framed document (the product's compressor pass), then a linear
  read-out per sub-position r of each latent (latent j -> the framed tokens j*R .. j*R+R-1,
  R = data.compression_rate): only the compressor's gather is learned, the reading is trivial.
- `decoder`: the generator reads oracle latents, latent j = sum over r of a fixed random
  vector per (r, token) (unit RMS), so the writing is given and only the reading is learned,
  through the product's `generate` (latent_up, slots, the stage-1 copy prompt).
- `joint`: both, as `bench/channel.py` does, through this probe's own loop (a check that the
  loop matches the benchmark's curve); with `--aux_weight W`, plus W times the `encoder`
  mode's read-out loss, so that the compressor has a signal of its own before the generator
  reads anything; with `--warmup_steps K`, the first K steps train the `encoder` mode's loss
  alone (a reconstruction warm-up of the compressor), then the joint loss; with `--copy`,
  the generator's output is mixed with a copy path over the read-out's decoded
  (slot, sub-position) pairs (`copy_mix`).

Same data (random documents over a 200-token alphabet), widths (configs/demo.py), optimizer
(the config's clip + AdamW, flat lr after 100 warm-up steps), batch and held-out set as the
benchmark; every weight trains. Prints one JSON line per evaluation and a final summary.

    .venv/bin/python projects/channel/probe_parts.py --mode encoder --n 32 --max_steps 1200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import channel  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from clara_jax.config import load_config_file  # noqa: E402
from clara_jax.model import (  # noqa: E402
    ModelConfig,
    compress,
    generate_logits,
    latent_span_logits,
)
from clara_jax.model.clara import CLaRa, span_position_code  # noqa: E402
from clara_jax.model.decoder import rope_positions  # noqa: E402
from clara_jax.model.layers import apply_rope  # noqa: E402
from clara_jax.train.optimizer import make_base_tx  # noqa: E402


def framed_docs(batch):
    """The framed, padded documents int32[B, T] and mask bool[B, T] of a copy batch."""
    return batch["doc_tokens"][:, 0], batch["doc_mask"][:, 0]


def subposition_code(t: int, rate: int, dim: int):
    """float32[T, D]: sin and cos of i mod R at the period's harmonics (amplitude 1, RMS
    1/sqrt(2))."""
    r = (jnp.arange(t) % rate)[:, None] * (2 * jnp.pi / rate)
    k = jnp.arange(1, dim // 2 + 1)[None] % max(rate // 2, 1) + 1
    return jnp.concatenate([jnp.sin(r * k), jnp.cos(r * k)], axis=1)


def compress_with_code(module, tokens, mask, code, bind=None):
    """CLaRa.compress for the 'append' layout with `code` float[T, D] added to the document
    tokens' input embeddings (RoPE binds position to queries and keys, never to values), and
    with `bind` float[T, D] (or None) multiplying them first: embedding * (1 + bind), a
    product of token and sub-position that a sum over the span keeps apart, where a sum of
    embedding + code leaves an unordered bag plus a constant."""
    cfg = module.cfg
    b, t = tokens.shape
    m = cfg.num_memory_tokens
    table = module.variables["params"]["decoder"]["embedding"]
    docs = jnp.take(table, tokens, axis=0)
    if bind is not None:
        docs = docs * (1 + bind[None, :t])
    docs = docs + code[None, :t]
    inject = jnp.concatenate([docs, jnp.broadcast_to(module.memory_embeddings, (b, m, cfg.dim))],
                             axis=1).astype(cfg.compute_dtype)
    full = jnp.concatenate([tokens, jnp.zeros((b, m), tokens.dtype)], axis=1)
    full_mask = jnp.concatenate([mask, jnp.ones((b, m), bool)], axis=1)
    _, hidden, _ = module.decoder(full, full_mask, inject, jnp.ones_like(full_mask),
                                  adapter="compressor", return_logits=False,
                                  causal=cfg.compressor_attention == "causal")
    memory = hidden[:, t:]
    return module.latent_down(memory) if cfg.projects_latents else memory


def generate_with_code(module, tokens, mask, slot_mask, inputs, offsets, span):
    """CLaRa.generate (no cache) from slot inputs float[B, S, D] already at width D, each slot
    taking `span` RoPE positions, with `offsets` float[B, T, D] (or None) added to the prompt's
    input embeddings."""
    index = jnp.clip(jnp.cumsum(slot_mask, axis=1) - 1, 0, inputs.shape[1] - 1)
    inject = jnp.take_along_axis(inputs, index[..., None], axis=1)
    logits, _, _ = module.decoder(tokens, mask, inject, slot_mask, adapter="generator",
                                  inject_span=span, input_offsets=offsets)
    return logits


def generate_hidden(module, tokens, mask, slot_mask, latents):
    """CLaRa.generate (no cache, K = 1) -> (logits float32[B, T, V], final hidden float[B, T, D],
    RoPE positions int32[B, T]) for the copy path."""
    cfg = module.cfg
    inputs = module.as_inputs(latents)  # [B, M, D]
    index = jnp.clip(jnp.cumsum(slot_mask, axis=1) - 1, 0, inputs.shape[1] - 1)
    inject = jnp.take_along_axis(inputs, index[..., None], axis=1)
    logits, hidden, _ = module.decoder(tokens, mask, inject, slot_mask, adapter="generator",
                                       inject_span=cfg.latent_span)
    positions, _ = rope_positions(mask, jnp.zeros(mask.shape[:1], jnp.int32), slot_mask,
                                  cfg.latent_span)
    return logits, hidden, positions


def copy_mix(cp, logits, hidden, positions, slot_mask, latent_inputs, span_logits, theta):
    """A copy path over the latents, as pointer-generator networks copy from their source.

    Key (j, r) = latent j's generator input times Wk plus a learned code of sub-position r,
    rotated to the RoPE position its text would have (slot j's position + r); the query is the
    generator's final state times Wq at its own position; the copy distribution is the
    attention-weighted mix of the read-out's softmax over the M x R keys, and a learned gate
    mixes it with the generator's own. logits: [B, T, V]; hidden: [B, T, D]; positions,
    slot_mask: [B, T]; latent_inputs: [B, M, D]; span_logits: [B, M, R, V] -> log-probs
    float32[B, T, V]."""
    b, m, r, v = span_logits.shape
    slot_pos = jnp.take_along_axis(positions, jnp.argsort(~slot_mask, axis=1, stable=True)[:, :m],
                                   axis=1)  # [B, M]
    key_pos = (slot_pos[:, :, None] + jnp.arange(r)[None, None]).reshape(b, m * r)
    keys = (jnp.einsum("bmd,dk->bmk", latent_inputs, cp["wk"])[:, :, None]
            + cp["sub"][None, None]).reshape(b, m * r, 1, -1)
    queries = jnp.einsum("btd,dk->btk", hidden.astype(jnp.float32), cp["wq"])[:, :, None]
    keys = apply_rope(keys, key_pos, theta)[:, :, 0]
    queries = apply_rope(queries, positions, theta)[:, :, 0]
    att = jax.nn.softmax(jnp.einsum("btk,bsk->bts", queries, keys) / keys.shape[-1] ** 0.5, -1)
    copy = jnp.einsum("bts,bsv->btv", att, jax.nn.softmax(span_logits.reshape(b, m * r, v), -1))
    gate = jax.nn.sigmoid(hidden.astype(jnp.float32) @ cp["wg"] + cp["bg"])  # [B, T, 1]
    mixed = (1 - gate) * jax.nn.softmax(logits, -1) + gate * copy
    return jnp.log(mixed + 1e-9)


def restrict_attention(allow):
    """ANDs allow: bool[T, T] into every call of the decoder's `attention_mask` on a row of T
    positions (process-wide); calls on rows of another length are left alone."""
    from clara_jax.model import decoder

    allow = jnp.asarray(allow)
    plain = decoder.attention_mask

    def given(key_valid, q_start, num_queries):
        mask = plain(key_valid, q_start, num_queries)
        return mask & allow[None] if mask.shape[1:] == allow.shape else mask

    decoder.attention_mask = given


def give_slots(batch, rate: int, compressor_len: int):
    """Restricts the generator's attention (every call of the decoder's `attention_mask` on a
    prompt of the copy rows' length) so that the input predicting document token i sees latent
    slot (i + 2) // R and no other slot. Every copy row has the same layout, so one [T, T]
    mask serves all; the compressor's pass has another length and is left alone."""
    slots = np.asarray(batch["slot_mask"])
    pos = np.asarray(batch["doc_pos"])
    assert (slots == slots[:1]).all() and (pos == pos[:1]).all(), "rows differ in layout"
    t = slots.shape[1]
    assert t != compressor_len, "the compressor's pass has the prompt's length"
    slot_at = np.flatnonzero(slots[0])  # key index of slot j
    allow = np.ones((t, t), bool)
    for i, q in enumerate(pos[0]):
        allow[q, slot_at] = False
        allow[q, slot_at[(i + 2) // rate]] = True
    restrict_attention(allow)


def give_spans(doc_len: int, m: int, rate: int):
    """Restricts the compressor pass (every call of the decoder's `attention_mask` on a row of
    doc_len + M positions, the 'append' layout) so that memory token j sees its own span of
    the framed document, positions j*R .. j*R+R-1, and itself; the document tokens keep their
    causal view. The generator's prompt has another length and is left alone."""
    allow = np.ones((doc_len + m, doc_len + m), bool)
    for j in range(m):
        allow[doc_len + j, :] = False
        allow[doc_len + j, j * rate:(j + 1) * rate] = True
        allow[doc_len + j, doc_len + j] = True
    restrict_attention(allow)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("encoder", "decoder", "joint"), required=True)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--max_steps", type=int, default=1200)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aux_weight", type=float, default=0.0, help="joint: weight of the "
                   "encoder read-out loss")
    p.add_argument("--warmup_steps", type=int, default=0, help="joint: train the compressor "
                   "and its read-out alone (the encoder mode's loss) for this many steps "
                   "first, then the generator's copy loss (plus --aux_weight times the "
                   "read-out's)")
    p.add_argument("--readout", choices=("learned", "perm"), default="learned",
                   help="learned: R linear heads L -> V; perm: no parameters, the latent as the "
                   "generator receives it, under a fixed permutation per r, against the "
                   "token embeddings")
    p.add_argument("--subpos", type=float, default=0.0, help="add this times a fixed "
                   "sinusoidal code of each document token's sub-position (i mod R) to its "
                   "input embedding in the compressor pass (0: the product's compress)")
    p.add_argument("--bind", type=float, default=0.0, help="multiply each document token's "
                   "input embedding in the compressor pass by 1 + this times the same "
                   "sub-position code (a token-by-position product; 0: none)")
    p.add_argument("--gen_subpos", type=float, default=0.0, help="add this times the "
                   "sub-position code of framed index k+2 (clara.span_position_code) to the "
                   "generator's input at the position that predicts document token k (0: the "
                   "product's generate)")
    p.add_argument("--subslots", type=int, default=1, help="the generator reads each latent "
                   "as this many slots (a learned L -> D map each, every slot taking "
                   "ceil(R / k) RoPE positions) instead of one through latent_up")
    p.add_argument("--given_slot", action="store_true", help="the generator's input that "
                   "predicts document token i may attend to latent slot (i + 2) // R alone "
                   "among the slots (its span's), so it need not find the slot itself")
    p.add_argument("--given_span", action="store_true", help="memory token j attends to "
                   "its own span of the framed document (and itself) alone in the compressor "
                   "pass, so it need not confine its attention itself")
    p.add_argument("--copy", type=int, default=0, help="joint: mix the generator's output with "
                   "a copy path over the read-out's decoded (slot, sub-position) pairs, its "
                   "keys and queries this wide (0: off)")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    overrides = ["train.lambda_retrieval=0", "train.train_base=true", *channel.COPY_OVERRIDES,
                 *args.set]
    config = channel.copy_config(load_config_file(str(REPO / "configs/demo.py"), overrides),
                                 args.n)
    cfg = ModelConfig.from_config(config)
    params, tok = channel.start_params(config, "random", args.seed)
    m, rate, lw = cfg.num_memory_tokens, int(config.data.compression_rate), cfg.latent_width
    td = int(config.data.doc_max_len)
    alphabet = channel.alphabet_ids(tok)
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed + 1)
    # Encoder read-out: R heads of L -> V; oracle table: [R, V, L] fixed unit-RMS vectors.
    trainable = {"model": params,
                 "readout": jax.random.normal(key, (rate, lw, cfg.vocab_size)) * lw ** -0.5}
    oracle = jax.random.normal(jax.random.fold_in(key, 1), (rate, cfg.vocab_size, lw))
    if args.copy:
        ck = jax.random.split(jax.random.fold_in(key, 3), 3)
        trainable["copy"] = {"wq": jax.random.normal(ck[0], (cfg.dim, args.copy)) * cfg.dim ** -0.5,
                             "wk": jax.random.normal(ck[1], (cfg.dim, args.copy)) * cfg.dim ** -0.5,
                             "sub": jax.random.normal(ck[2], (rate, args.copy)),
                             "wg": jnp.zeros((cfg.dim, 1)), "bg": jnp.zeros((1,))}
    if args.subslots > 1:
        trainable["subslot_up"] = jax.random.normal(
            jax.random.fold_in(key, 2), (args.subslots, lw, cfg.dim)) * lw ** -0.5

    def make(docs):
        batch = channel.copy_batch(tok, docs, m * args.subslots, td)
        batch["doc_pos"] = channel.doc_positions(batch, args.n)
        return jax.tree.map(jnp.asarray, batch)

    def oracle_latents(doc_tokens):  # [B, T] -> [B, M, L]
        per = oracle[jnp.arange(td) % rate, doc_tokens]  # [B, T, L]
        return per.reshape(doc_tokens.shape[0], m, rate, lw).sum(2) * rate ** -0.5

    code = subposition_code(td, rate, cfg.dim) * args.subpos  # [T, D]
    bind = subposition_code(td, rate, cfg.dim) * args.bind if args.bind else None

    def compress_(params, doc_tokens, doc_mask):
        if not (args.subpos or args.bind):
            return compress(cfg, params, doc_tokens, doc_mask)
        return CLaRa(cfg).apply({"params": params}, doc_tokens, doc_mask, code, bind,
                                method=compress_with_code)

    def encoder_logits(tr, doc_tokens, doc_mask):  # -> [B, T, V] logits for each framed token
        lat = compress_(tr["model"], doc_tokens, doc_mask)  # [B, M, L]
        if args.readout == "perm":  # the product's read-out (train.span_weight)
            logits = latent_span_logits(cfg, tr["model"], lat, rate)
        else:
            logits = jnp.einsum("bml,rlv->bmrv", lat, tr["readout"])
        return logits.reshape(doc_tokens.shape[0], td, -1)

    def generator_logits(tr, batch):
        doc_tokens, doc_mask = framed_docs(batch)
        lat = (oracle_latents(doc_tokens) if args.mode == "decoder"
               else compress_(tr["model"], doc_tokens, doc_mask))
        if args.gen_subpos or args.subslots > 1:
            bb, t = batch["tokens"].shape
            offsets = None
            if args.gen_subpos:
                pos = batch["doc_pos"]  # [B, N]: the inputs predicting document tokens 0..N-1
                code = args.gen_subpos * span_position_code(
                    jnp.broadcast_to(jnp.arange(2, 2 + args.n), pos.shape), rate, cfg.dim)
                offsets = jnp.zeros((bb, t, cfg.dim)).at[jnp.arange(bb)[:, None], pos].set(code)
            if args.subslots > 1:
                inputs = jnp.einsum("bml,kld->bmkd", lat, tr["subslot_up"]).reshape(
                    bb, m * args.subslots, cfg.dim)
                span = -(-rate // args.subslots)
            else:
                inputs = CLaRa(cfg).apply({"params": tr["model"]}, lat, method="as_inputs")
                span = cfg.latent_span
            return CLaRa(cfg).apply({"params": tr["model"]}, batch["tokens"], batch["mask"],
                                    batch["slot_mask"], inputs, offsets, span,
                                    method=generate_with_code)
        if args.copy:
            model = CLaRa(cfg)
            logits, hidden, positions = model.apply(
                {"params": tr["model"]}, batch["tokens"], batch["mask"], batch["slot_mask"], lat,
                method=generate_hidden)
            inputs = model.apply({"params": tr["model"]}, lat, method="as_inputs")
            span = jnp.einsum("bml,rlv->bmrv", lat, tr["readout"])
            return copy_mix(tr["copy"], logits, hidden, positions, batch["slot_mask"], inputs,
                            span, cfg.rope_theta)
        logits, _ = generate_logits(cfg, tr["model"], batch["tokens"], batch["mask"],
                                    batch["slot_mask"], lat[:, None])
        return logits

    doc_slice = slice(2, 2 + args.n)  # framed: <ENC> BOS doc EOS

    def readout_loss(tr, batch):
        doc_tokens, doc_mask = framed_docs(batch)
        logits = encoder_logits(tr, doc_tokens, doc_mask)[:, doc_slice]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, doc_tokens[:, doc_slice]).mean()

    def loss_fn(tr, batch, warming=False):
        if args.mode == "encoder" or warming:
            return readout_loss(tr, batch)
        logits = generator_logits(tr, batch)
        w = batch["loss_mask"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        loss = jnp.sum(ce * w) / jnp.sum(w)
        if args.mode == "joint" and args.aux_weight:
            loss = loss + args.aux_weight * readout_loss(tr, batch)
        return loss

    tx = make_base_tx(config)
    opt = tx.init(trainable)

    @partial(jax.jit, static_argnums=3)
    def step(tr, opt, batch, warming=False):
        loss, g = jax.value_and_grad(loss_fn)(tr, batch, warming)
        updates, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, updates), opt, loss

    held = make(alphabet[rng.integers(0, channel.ALPHABET, (channel.HELDOUT, args.n))])
    held_pos = held["doc_pos"]
    if args.given_span:
        assert cfg.memory_layout == "append" and td == m * rate, (cfg.memory_layout, td, m, rate)
        give_spans(td, m, rate)
    if args.given_slot:
        give_slots(held, rate, td + m)

    @jax.jit
    def readout_accuracy(tr):
        doc_tokens, doc_mask = framed_docs(held)
        pred = jnp.argmax(encoder_logits(tr, doc_tokens, doc_mask), -1)[:, doc_slice]
        return jnp.mean((pred == doc_tokens[:, doc_slice]).astype(jnp.float32), 0)

    @jax.jit
    def accuracy(tr):
        if args.mode == "encoder":
            return readout_accuracy(tr)
        pred = jnp.take_along_axis(jnp.argmax(generator_logits(tr, held), -1), held_pos, 1)
        gold = jnp.take_along_axis(held["targets"], held_pos, 1)
        return jnp.mean((pred == gold).astype(jnp.float32), 0)

    b = int(config.train.batch_size)
    start, curve = time.perf_counter(), []
    for i in range(args.max_steps + 1):
        if i % args.eval_every == 0:
            by_pos = np.asarray(accuracy(trainable))
            curve.append({"step": i, "seconds": round(time.perf_counter() - start, 1),
                          "token_accuracy": round(float(by_pos.mean()), 4)})
            if args.mode == "joint" and (args.warmup_steps or args.aux_weight):
                curve[-1]["readout_accuracy"] = round(float(readout_accuracy(trainable).mean()),
                                                      4)
            print(json.dumps({"mode": args.mode, "n": args.n, **curve[-1]}), flush=True)
        if i == args.max_steps:
            break
        batch = make(alphabet[rng.integers(0, channel.ALPHABET, (b, args.n))])
        trainable, opt, _ = step(trainable, opt, batch,
                                 args.mode == "joint" and i < args.warmup_steps)
    print(json.dumps({"mode": args.mode, "n": args.n, "aux_weight": args.aux_weight,
                      "warmup_steps": args.warmup_steps,
                      "readout": args.readout, "subpos": args.subpos, "bind": args.bind,
                      "gen_subpos": args.gen_subpos,
                      "subslots": args.subslots, "given_slot": args.given_slot,
                      "given_span": args.given_span, "copy": args.copy,
                      "overrides": overrides,
                      "final": curve[-1], "accuracy_by_position":
                      [round(float(a), 3) for a in by_pos], "curve": curve}))


if __name__ == "__main__":
    main()
