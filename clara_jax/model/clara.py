"""The CLaRa module: one decoder, three LoRA adapters, memory tokens and the latent projection.

- `compress(doc_tokens)`: the document (already framed as `<ENC> BOS doc EOS`, right-padded)
  followed by M learned memory embeddings (or with memory token j after the document's j-th
  chunk, `memory_layout='interleave'`, or appended but at the RoPE position of the end of its
  chunk, `memory_layout='spread'`); the latents are the final hidden states at those M
  positions, projected to width L when L < D. With `model.span_code` > 0, each input token's
  embedding first gets that times a fixed code of its sub-position (`span_position_code`).
  With `model.chunk_write`, latent j also gets a learned linear map of the final hidden states
  of the j-th chunk of the document, in order (`chunk_latents`).
- `encode_query(tokens)`: the same under the `query` adapter.
- `generate(tokens, slot_mask, latents)`: the generator's prompt with K·M latent slots; the
  input embeddings at the slots (in order) are replaced by the K documents' latents, projected
  back to width D when L < D; each slot takes `latent_span` RoPE positions (1 as published, or
  the compression rate with `model.latent_positions='spread'`, so that a latent sits where the
  text it stands for would).
- `span_logits(latents)`: with `model.span_head`, a learned read-out of each latent's span
  (one L -> V map per sub-position), a stage-1/2 training signal for the compressor, and
  with `model.latent_copy` what the generator's copy path copies (`copy_memory`,
  `copy_mix`): the generator's output then mixes its own distribution with attention over
  the K·M·R (latent, sub-position) read-outs, kept in the KV cache for decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from clara_jax.model import sharding as sh
from clara_jax.model.config import ModelConfig
from clara_jax.model.decoder import Decoder, rope_positions
from clara_jax.model.layers import apply_rope


def memory_order(t: int, m: int, layout: str) -> np.ndarray:
    """The compressor pass's order of its T document positions (0..T-1) and M memory tokens
    (T..T+M-1): int[T + M], a static permutation.

    'append' (the published method): the document, then the M memory tokens. 'interleave':
    memory token j right after the j-th of M equal chunks of the T positions, so each memory
    token summarises the text just before it, the same local pattern for every j, where
    appended memory tokens must each learn their own distant span.
    """
    if layout == "append":
        return np.arange(t + m)
    stride = -(-t // m)
    order = []
    for j in range(m):
        order += list(range(min(j * stride, t), min((j + 1) * stride, t))) + [t + j]
    return np.asarray(order)


def valid_token_index(mask):
    """mask: bool[B, T] -> int32[B, T]: each valid token's index among its row's valid tokens
    (0 .. n-1; a padding position repeats the last)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def spread_memory_positions(mask, m: int):
    """mask: bool[B, T] (the document's valid tokens) -> int32[B, T + M], the RoPE positions of
    the compressor pass with memory tokens appended but placed where their text sits.

    Document tokens keep their positions 0..n-1 (n valid tokens); memory token j takes
    (j+1)·n // M, the end of the j-th of M equal spans, so every memory token meets its own
    span at the same relative offsets (as one token per latent does when appended), while the
    causal order still lets it read the whole document.
    """
    doc = valid_token_index(mask)
    n = jnp.sum(mask, axis=1, dtype=jnp.int32, keepdims=True)
    memory = (jnp.arange(1, m + 1, dtype=jnp.int32)[None] * n) // m
    return jnp.concatenate([doc, memory], axis=1)


def span_position_code(index, period: int, dim: int):
    """index: int[B, T] (a token's index among its row's valid tokens) -> float32[B, T, D]:
    sinusoids of index mod `period` at the period's harmonics 1 .. max(period // 2, 1), cycled
    over the D // 2 (sin, cos) pairs; each entry in [-1, 1].

    Which of its latent's R tokens a token is, put into the token itself: RoPE makes attention
    weights depend on position but never the values, so a memory token that averages its span
    would otherwise read an unordered bag of tokens.
    """
    harmonic = jnp.arange(dim // 2) % max(period // 2, 1) + 1  # [D/2]
    angle = ((index % period)[..., None] * harmonic) * (2 * np.pi / period)
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1).astype(jnp.float32)


class CLaRa(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.decoder = Decoder(cfg)
        self.memory_embeddings = self.param(
            "memory_embeddings",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                         (sh.MEMORY, sh.EMBED)),
            (cfg.num_memory_tokens, cfg.dim), jnp.float32)
        if cfg.projects_latents:
            def dense(name, din, dout, names):
                return nn.Dense(dout, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                                kernel_init=nn.with_logical_partitioning(
                                    nn.initializers.lecun_normal(), names),
                                bias_init=nn.with_logical_partitioning(
                                    nn.initializers.zeros, names[1:]),
                                name=name)

            self.latent_down = dense("latent_down", cfg.dim, cfg.latent_width,
                                     (sh.EMBED, sh.LATENT))
            self.latent_up = dense("latent_up", cfg.latent_width, cfg.dim, (sh.LATENT, sh.EMBED))
        if cfg.span_head_rate:
            width = cfg.latent_width
            self.span_head = self.param(
                "span_head",
                nn.with_logical_partitioning(
                    lambda key, shape, dtype: jax.random.normal(key, shape, dtype) * width ** -0.5,
                    (None, sh.LATENT, sh.VOCAB)),
                (cfg.span_head_rate, width, cfg.vocab_size), jnp.float32)
        if cfg.latent_copy:
            def param(name, shape, names, init):
                return self.param(name, nn.with_logical_partitioning(init, names), shape,
                                  jnp.float32)

            h = cfg.head_dim
            self.copy_query = param("copy_query", (cfg.dim, h), (sh.EMBED, None),
                                    nn.initializers.lecun_normal())
            self.copy_key = param("copy_key", (cfg.dim, h), (sh.EMBED, None),
                                  nn.initializers.lecun_normal())
            self.copy_subpos = param("copy_subpos", (cfg.span_head_rate, h), (None, None),
                                     nn.initializers.normal(1.0))
            self.copy_gate = param("copy_gate", (cfg.dim, 1), (sh.EMBED, None),
                                   nn.initializers.zeros)
            self.copy_gate_bias = param("copy_gate_bias", (1,), (None,), nn.initializers.zeros)
            if cfg.copy_content:
                # The key side from zero: the content term starts at 0, the pointer as without.
                self.copy_content_query = param("copy_content_query", (cfg.dim, h),
                                                (sh.EMBED, None), nn.initializers.lecun_normal())
                self.copy_content_key = param("copy_content_key", (cfg.dim, h),
                                              (sh.EMBED, None), nn.initializers.zeros)
                self.copy_previous_key = param("copy_previous_key", (cfg.dim, h),
                                               (sh.EMBED, None), nn.initializers.zeros)
        if cfg.chunk_write_rate:
            # Zero at init: training starts from the published write (memory tokens alone).
            self.chunk_write = self.param(
                "chunk_write",
                nn.with_logical_partitioning(nn.initializers.zeros,
                                             (None, sh.EMBED, sh.LATENT)),
                (cfg.chunk_write_rate, cfg.dim, cfg.latent_width), jnp.float32)

    def compress(self, tokens, mask, adapter: str = "compressor", deterministic: bool = True,
                 with_means: bool = False):
        """tokens: int32[B, T]; mask: bool[B, T] -> latents float[B, M, L].

        With `with_means`, also returns the mean of the document tokens' final hidden states
        and the mean of the memory tokens' final hidden states, both float32[B, D] (for the
        stage-1 MSE alignment).
        """
        cfg = self.cfg
        b, t = tokens.shape
        m = cfg.num_memory_tokens
        full_tokens = jnp.concatenate([tokens, jnp.zeros((b, m), tokens.dtype)], axis=1)
        full_mask = jnp.concatenate([mask, jnp.ones((b, m), bool)], axis=1)
        slots = jnp.concatenate([jnp.zeros((b, t), bool), jnp.ones((b, m), bool)], axis=1)
        inject = jnp.concatenate(
            [jnp.zeros((b, t, cfg.dim), cfg.compute_dtype),
             jnp.broadcast_to(self.memory_embeddings.astype(cfg.compute_dtype),
                              (b, m, cfg.dim))], axis=1)
        offsets = None
        if cfg.span_code:
            code = cfg.span_code * span_position_code(valid_token_index(mask),
                                                      cfg.span_code_period, cfg.dim)
            offsets = jnp.concatenate(
                [jnp.where(mask[..., None], code, 0.0), jnp.zeros((b, m, cfg.dim))], axis=1)
        permuted = cfg.memory_layout == "interleave"
        if permuted:
            order = memory_order(t, m, cfg.memory_layout)
            full_tokens, full_mask, inject, slots = (
                x[:, order] for x in (full_tokens, full_mask, inject, slots))
            offsets = None if offsets is None else offsets[:, order]
        positions = (spread_memory_positions(mask, m) if cfg.memory_layout == "spread"
                     else None)
        _, hidden, _ = self.decoder(full_tokens, full_mask, inject, slots, adapter=adapter,
                                    deterministic=deterministic, return_logits=False,
                                    positions=positions,
                                    causal=cfg.compressor_attention == "causal",
                                    input_offsets=offsets)
        if permuted:
            hidden = hidden[:, np.argsort(order)]  # back to documents first, then memory
        memory_hidden = hidden[:, t:]
        latents = self.latent_down(memory_hidden) if cfg.projects_latents else memory_hidden
        if cfg.chunk_write_rate:
            latents = latents + self.chunk_latents(hidden[:, :t], mask)
        if not with_means:
            return latents
        h32 = hidden[:, :t].astype(jnp.float32)
        w = mask.astype(jnp.float32)[..., None]
        doc_mean = jnp.sum(h32 * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        mem_mean = jnp.mean(memory_hidden.astype(jnp.float32), axis=1)
        return latents, doc_mean, mem_mean

    def chunk_latents(self, doc_hidden, mask):
        """The linear write (model.chunk_write): doc_hidden float[B, T, D] (final hidden
        states), mask bool[B, T] -> float[B, M, L]: latent j gets positions j·R .. j·R + R - 1
        (the tokens the span read-out names for it), their states concatenated in order times
        the [R, D, L] kernel; padding and positions past M·R (a query longer than a
        document) add nothing, and reach the latents through the memory tokens alone.

        Attention gathers a span's values into a sum whose order the heads must learn to keep;
        here each sub-position has its own block, so the write is ordered from the first step.
        """
        b, t, d = doc_hidden.shape
        m, r = self.cfg.num_memory_tokens, self.cfg.chunk_write_rate
        h = jnp.where(mask[..., None], doc_hidden, 0).astype(self.cfg.compute_dtype)
        h = jnp.pad(h, ((0, 0), (0, max(m * r - t, 0)), (0, 0)))[:, :m * r]
        kernel = self.chunk_write.astype(self.cfg.compute_dtype)
        return jnp.einsum("bmrd,rdl->bml", h.reshape(b, m, r, d), kernel)

    def encode_query(self, tokens, mask, deterministic: bool = True):
        """tokens: int32[B, T]; mask: bool[B, T] -> query latents float[B, M, L]."""
        return self.compress(tokens, mask, adapter="query", deterministic=deterministic)

    def generate(self, tokens, mask, slot_mask, latents, cache=None, deterministic: bool = True,
                 last_logits_only: bool = False, with_copied: bool = False):
        """The generator forward with documents given as latents.

        tokens: int32[B, T]; mask: bool[B, T]; slot_mask: bool[B, T] with K·M True positions
        per row (fewer when a cache holds earlier slots); latents: float[B, K, M, L].
        Returns (logits float32[B, T, V] (or [B, 1, V], the last position, with
        `last_logits_only`), new cache or None); with `with_copied` (model.latent_copy) also
        the copy path's own log-distribution float32[B, T, V] before the gate mixes it in, its
        read-outs held constant (what train.pointer_weight trains: the pointer).
        """
        cfg = self.cfg
        b = latents.shape[0]
        flat = self.as_inputs(latents).reshape(b, -1, cfg.dim)  # [B, K*M, D]
        index = jnp.clip(jnp.cumsum(slot_mask, axis=1) - 1, 0, flat.shape[1] - 1)
        inject = jnp.take_along_axis(flat, index[..., None], axis=1)
        logits, hidden, new_cache = self.decoder(tokens, mask, inject, slot_mask, cache=cache,
                                                 adapter="generator",
                                                 deterministic=deterministic,
                                                 last_logits_only=last_logits_only,
                                                 inject_span=cfg.latent_span)
        if not cfg.latent_copy:
            if with_copied:
                raise ValueError("with_copied needs model.latent_copy=True")
            return logits, new_cache
        seen = jnp.zeros((b,), jnp.int32) if cache is None else cache["next_position"]
        positions, _ = rope_positions(mask, seen, slot_mask, cfg.latent_span)
        keys, probs = self.copy_memory(latents, positions, slot_mask)
        # A row without slots (a text row of data.text_share, batch padding) reads no latents,
        # so it copies nothing from them either.
        memory = {"copy_keys": keys, "copy_probs": probs,
                  "copy_rows": jnp.any(slot_mask, axis=1).astype(jnp.float32)}
        return self._with_copy(logits, hidden, positions, memory, new_cache, last_logits_only,
                               with_copied)

    def _with_copy(self, logits, hidden, positions, memory, new_cache, last_logits_only,
                   with_copied: bool = False):
        """copy_mix under memory = {copy_keys, copy_probs, copy_rows}, which decoding steps
        then read from the cache -> (mixed log-probs, new cache), plus copy_mix's copied
        log-probs with `with_copied`."""
        if last_logits_only:
            hidden, positions = hidden[:, -1:], positions[:, -1:]
        out = self.copy_mix(logits, hidden, positions, memory["copy_keys"],
                            memory["copy_probs"], memory["copy_rows"], with_copied)
        cache = None if new_cache is None else {**new_cache, **memory}
        return (out[0], cache, out[1]) if with_copied else (out, cache)

    def copy_memory(self, latents, positions, slot_mask):
        """What the copy path attends over (model.latent_copy): latents float[B, K, M, L];
        positions int32[B, T] (the prompt's RoPE positions) and slot_mask bool[B, T] (its K·M
        latent slots, in order) -> (keys float32[B, S, H], probs float32[B, S, V]) for the
        S = K·M·R (latent, sub-position) pairs: key = the latent's generator input times
        `copy_key` plus a learned code of r, rotated to where the r-th token of its text would
        sit; probs = the span read-out's softmax (`span_logits`). With model.copy_content the
        keys are [B, S, 2H]: after those H, unrotated, the read-out's expected output
        embedding times `copy_content_key` plus the previous pair's (in its document) times
        `copy_previous_key`."""
        cfg = self.cfg
        b, k, m, _ = latents.shape
        r = cfg.span_head_rate
        first_slots = jnp.argsort(~slot_mask, axis=1, stable=True)[:, :k * m]
        slot_positions = jnp.take_along_axis(positions, first_slots, axis=1)  # [B, K·M]
        inputs = self.as_inputs(latents).reshape(b, k * m, cfg.dim).astype(jnp.float32)
        keys = (inputs @ self.copy_key)[:, :, None] + self.copy_subpos[None, None]
        offset = (jnp.arange(r, dtype=jnp.int32) * cfg.latent_span) // r
        positions = (slot_positions[:, :, None] + offset).reshape(b, k * m * r)
        keys = apply_rope(keys.reshape(b, k * m * r, 1, -1), positions, cfg.rope_theta)[:, :, 0]
        probs = jax.nn.softmax(self.span_logits(latents.reshape(b, k * m, -1)), axis=-1)
        probs = probs.reshape(b, k * m * r, -1)
        if cfg.copy_content:
            embeds = jnp.einsum("bsv,dv->bsd", probs, self.output_embedding())
            # The token before each pair, in its document's order (none before a document's
            # first pair): an induction match, where the state of the last answer token
            # finds the pair that follows it in the document.
            before = jnp.pad(embeds.reshape(b, k, m * r, -1)[:, :, :-1],
                             ((0, 0), (0, 0), (1, 0), (0, 0))).reshape(embeds.shape)
            keys = jnp.concatenate([keys, embeds @ self.copy_content_key
                                    + before @ self.copy_previous_key], axis=-1)
        return keys, probs

    def copy_mix(self, logits, hidden, positions, keys, probs, rows, with_copied: bool = False):
        """The generator's output with the copy path: logits float32[B, T, V]; hidden
        float[B, T, D] (its final states); positions int32[B, T]; keys, probs from
        `copy_memory`; rows float32[B] (1 where the row's prompt has latent slots, else 0) ->
        mixed log-probabilities float32[B, T, V], (1 - g) softmax(logits) + g copied: copied =
        the attention-weighted read-outs, g = rows times the sigmoid of a learned gate on the
        state. With `with_copied`, (mixed, copied's log) where copied holds the read-outs
        constant (its gradient reaches the pointer only).

        Reading sub-position r of one latent needs its own map per r inside the generator,
        which it did not learn in 1,000 steps at 17 tokens a latent; the span read-out already
        is those maps, so the generator only has to learn where to point
        (docs/design.md, "The latent channel")."""
        weights, gate = self.copy_pointer(hidden, positions, keys)
        copied = jnp.einsum("bts,bsv->btv", weights, probs)
        gate = gate * rows[:, None, None]
        mixed = jnp.log((1 - gate) * jax.nn.softmax(logits, axis=-1) + gate * copied + 1e-9)
        if not with_copied:
            return mixed
        # The pointer's own loss must not rewrite the read-outs (the span loss writes them):
        # through them it cut the answer tokens read out from 0.49 to 0.23 (arm E of
        # projects/demo/README.md; held, arm F: 0.38).
        pointed = jnp.einsum("bts,bsv->btv", weights, jax.lax.stop_gradient(probs))
        return mixed, jnp.log(pointed + 1e-9)

    def copy_pointer(self, hidden, positions, keys):
        """Where the copy path points and how much it copies: hidden float[B, T, D];
        positions int32[B, T]; keys float32[B, S, H] from `copy_memory` -> (attention
        weights float32[B, T, S] over the (latent, sub-position) pairs, gate float32[B, T, 1]
        before a row without slots zeroes it)."""
        h32 = hidden.astype(jnp.float32)
        query = apply_rope((h32 @ self.copy_query)[:, :, None], positions,
                           self.cfg.rope_theta)[:, :, 0]
        if self.cfg.copy_content:
            query = jnp.concatenate([query, h32 @ self.copy_content_query], axis=-1)
        weights = jax.nn.softmax(jnp.einsum("bth,bsh->bts", query, keys)
                                 / np.sqrt(self.cfg.head_dim), axis=-1)
        return weights, jax.nn.sigmoid(h32 @ self.copy_gate + self.copy_gate_bias)

    def output_embedding(self):
        """The decoder's output embedding float32[D, V] (its token embedding when tied)."""
        p = self.decoder.variables["params"]
        w = p["embedding"].T if self.cfg.tie_embeddings else p["unembed"]
        return nn.unbox(w).astype(jnp.float32)  # boxed (logically partitioned) during init

    def as_inputs(self, latents):
        """latents float[..., M, L] -> the generator's input embeddings float[..., M, D]
        (projected back to width D when L < D)."""
        lat = latents.astype(self.cfg.compute_dtype)
        return self.latent_up(lat) if self.cfg.projects_latents else lat

    def span_logits(self, latents):
        """The learned span read-out (model.span_head): latents float[B, M, L] ->
        float32[B, M, R, V], latent j's guess of the r-th token of its span."""
        return jnp.einsum("bml,rlv->bmrv", latents.astype(jnp.float32), self.span_head)

    def decode(self, tokens, mask=None, cache=None, adapter: str | None = None,
               deterministic: bool = True, last_logits_only: bool = False):
        """The plain decoder. tokens: int32[B, T] -> (logits float32[B, T, V], cache)
        (logits of the last position only, [B, 1, V], with `last_logits_only`); after a latent
        prompt whose cache holds the copy memory (model.latent_copy), the generator's
        log-probabilities with the copy path."""
        logits, hidden, new_cache = self.decoder(tokens, mask, cache=cache, adapter=adapter,
                                                 deterministic=deterministic,
                                                 last_logits_only=last_logits_only)
        if cache is None or "copy_keys" not in cache:
            return logits, new_cache
        # A decoding step after a latent prompt (generate) put the copy memory in the cache.
        mask = jnp.ones(tokens.shape, bool) if mask is None else mask
        positions, _ = rope_positions(mask, cache["next_position"])
        memory = {k: cache[k] for k in ("copy_keys", "copy_probs", "copy_rows")}
        return self._with_copy(logits, hidden, positions, memory, new_cache, last_logits_only)

    def __call__(self, doc_tokens, doc_mask, tokens, mask, slot_mask):
        """Touches every parameter (used by init)."""
        latents = self.compress(doc_tokens, doc_mask)
        if self.cfg.span_head_rate and not self.cfg.latent_copy:  # generate touches it then
            self.span_logits(latents)
        return self.generate(tokens, mask, slot_mask, latents[:, None])
