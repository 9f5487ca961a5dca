"""Jitted batched generation over a preallocated KV cache.

`generate_padded` is the device computation: prefill the left-padded prompts (with the K
documents' latents in the slots in latent mode), then a `lax.while_loop` that decodes one token
per row per step, writing into the shared cache index. Left padding makes every row's last prompt
token sit at the same column, so one decode step serves every row; RoPE positions count only
valid tokens (see clara_jax/model/decoder.py), so a padded row gets the same positions as the
unpadded prompt. Rows stop independently at EOS; the loop ends when all rows are done or after
`max_new_tokens` steps.

`generate_recompute` is the same loop without a cache (the whole sequence is recomputed each
step); it exists as the reference for the cache and as the benchmark's baseline.

`Generator` is the host-side entry point: it pads a list of prompts up to a (batch, length)
bucket, so the device function compiles once per bucket and never per call.

Shape letters as in docs/design.md; N = max_new_tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clara_jax.model import ModelConfig, decode, generate_logits, init_cache
from clara_jax.model.sharding import batch_sharding

# Number of times each device function has been traced (= compiled for a new signature).
# Tests use it to check that calls within one bucket never recompile.
TRACE_COUNTS: collections.Counter = collections.Counter()

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 means greedy (argmax). top_k 0 and top_p 1
    disable those filters. All three are traced values: changing them never recompiles."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"Sampling.temperature={self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"Sampling.top_k={self.top_k}: must be >= 0 (0 disables)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"Sampling.top_p={self.top_p}: must be in (0, 1]")

    def as_arrays(self):
        return (jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p))


GREEDY = Sampling()


class Generation(NamedTuple):
    """tokens: int32[B, N] (the answer is tokens[b, :lengths[b]]; the EOS, if produced, sits at
    lengths[b], and pad_id fills the rest); lengths: int32[B] (EOS excluded);
    entropy: float32[B, N], the entropy in nats of the model's next-token distribution at each
    generated position (temperature 1, before filtering), 0 after the row stopped."""

    tokens: jax.Array
    lengths: jax.Array
    entropy: jax.Array


def sample_next(logits, rng, temperature, top_k, top_p):
    """logits: float32[B, V]; rng: key; temperature, top_p: float32[]; top_k: int32[]
    -> int32[B]. Greedy when temperature == 0; otherwise softmax(logits / temperature) restricted
    to the top_k most likely tokens, then to the smallest set whose mass reaches top_p (ties at a
    threshold are all kept)."""
    vocab = logits.shape[-1]

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        x = logits / jnp.maximum(temperature, 1e-6)
        desc = -jnp.sort(-x, axis=-1)  # [B, V], most likely first
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        rank = jnp.arange(vocab)
        desc = jnp.where(rank[None] < k, desc, -jnp.inf)
        probs = jax.nn.softmax(desc, axis=-1)
        # Keep rank i while the mass of the ranks before it is still short of top_p; rank 0 is
        # always kept, so the set is never empty. Ranks past k are dropped explicitly: their
        # probability is 0, and a cumulative sum that rounds to just under 1 would keep them.
        keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p) & (rank[None] < k)
        keep = keep.at[:, 0].set(True)
        n_keep = jnp.sum(keep, axis=-1)  # [B]
        cutoff = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)  # [B, 1]
        x = jnp.where(x >= cutoff, x, -jnp.inf)
        return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)

    return lax.cond(temperature > 0, sampled, greedy)


def _entropy(logits):
    """logits: float32[B, V] -> float32[B], entropy in nats."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _prefill(cfg, params, tokens, mask, slot_mask, latents, cache, adapter, last_only):
    if latents is None:
        return decode(cfg, params, tokens, mask, cache=cache, adapter=adapter,
                      last_logits_only=last_only)
    return generate_logits(cfg, params, tokens, mask, slot_mask, latents, cache=cache,
                           last_logits_only=last_only)


def _emit(i, logits, out, ent, done, lengths, rng, sampling, eos_id, pad_id):
    """Samples answer token i of every row from logits float32[B, V] and records it: rows
    already done get pad and no entropy; a row's length stops growing at its EOS.
    Returns (tok int32[B], out, ent, done, lengths)."""
    temperature, top_k, top_p = sampling
    tok = sample_next(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
    tok = jnp.where(done, pad_id, tok)
    out = lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
    ent = lax.dynamic_update_slice_in_dim(
        ent, jnp.where(done, 0.0, _entropy(logits))[:, None], i, axis=1)
    newly = ~done & (tok == eos_id)
    lengths = lengths + (~done & ~newly).astype(jnp.int32)
    return tok, out, ent, done | newly, lengths


def _check_adapter(latents, adapter):
    if latents is not None and adapter != "generator":
        raise ValueError(f"latent prompts always use the generator adapter, got {adapter!r}")


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "adapter"))
def generate_padded(cfg: ModelConfig, params, tokens, mask, slot_mask, latents, rng, eos_id,
                    pad_id, sampling, *, max_new_tokens: int, adapter: str | None = "generator"):
    """Batched generation from left-padded prompts, on device.

    tokens: int32[B, T], left-padded (the last column holds every row's last prompt token);
    mask: bool[B, T] (False on padding; an all-False row is batch padding, its output is
    meaningless); slot_mask: bool[B, T] and latents: float[B, K, M, L] in latent mode, both None
    for text and closed-book prompts; rng: key; eos_id, pad_id: int32[]; sampling: the triple
    from `Sampling.as_arrays()`. Returns a `Generation` with N = max_new_tokens.
    """
    TRACE_COUNTS["generate_padded"] += 1
    _check_adapter(latents, adapter)
    temperature, top_k, top_p = sampling
    b, t = tokens.shape
    n = max_new_tokens
    cache = init_cache(cfg, b, t + n)
    # Only the last position's logits: [B, T, V] would be gigabytes at 7B with long prompts.
    logits, cache = _prefill(cfg, params, tokens, mask, slot_mask, latents, cache, adapter,
                             last_only=True)
    last = logits[:, -1]
    first = sample_next(last, jax.random.fold_in(rng, 0), temperature, top_k, top_p)
    out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
    ent = jnp.zeros((b, n), jnp.float32).at[:, 0].set(_entropy(last))
    done = first == eos_id
    lengths = jnp.where(done, 0, 1).astype(jnp.int32)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, cache, out, ent, done, lengths = state
        prev = lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [B, 1]
        step_logits, cache = decode(cfg, params, prev, jnp.ones((b, 1), bool), cache=cache,
                                    adapter=adapter)
        tok, out, ent, done, lengths = _emit(i, step_logits[:, 0], out, ent, done, lengths,
                                             rng, sampling, eos_id, pad_id)
        return i + 1, cache, out, ent, done, lengths

    state = (jnp.int32(1), cache, out, ent, done, lengths)
    _, _, out, ent, _, lengths = lax.while_loop(cond, body, state)
    return Generation(out, lengths, ent)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "adapter"))
def generate_recompute(cfg: ModelConfig, params, tokens, mask, slot_mask, latents, rng, eos_id,
                       pad_id, sampling, *, max_new_tokens: int,
                       adapter: str | None = "generator"):
    """The same contract as `generate_padded`, without a KV cache: every step runs the decoder
    over the whole fixed-size buffer [prompt | N answer positions] (positions not generated yet
    are masked out), as a cache-less implementation that compiles once must."""
    TRACE_COUNTS["generate_recompute"] += 1
    _check_adapter(latents, adapter)
    b, t = tokens.shape
    n = max_new_tokens
    buf = jnp.concatenate([tokens, jnp.full((b, n), pad_id, jnp.int32)], axis=1)
    slots = None
    if latents is not None:
        slots = jnp.concatenate([slot_mask, jnp.zeros((b, n), bool)], axis=1)
    out = jnp.full((b, n), pad_id, jnp.int32)
    ent = jnp.zeros((b, n), jnp.float32)
    done = jnp.zeros((b,), bool)
    lengths = jnp.zeros((b,), jnp.int32)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, buf, out, ent, done, lengths = state
        full_mask = jnp.concatenate([mask, jnp.broadcast_to(jnp.arange(n) < i, (b, n))], axis=1)
        all_logits, _ = _prefill(cfg, params, buf, full_mask, slots, latents, None, adapter,
                                 last_only=False)
        logits = lax.dynamic_index_in_dim(all_logits, t + i - 1, axis=1, keepdims=False)
        tok, out, ent, done, lengths = _emit(i, logits, out, ent, done, lengths, rng, sampling,
                                             eos_id, pad_id)
        buf = lax.dynamic_update_slice_in_dim(buf, tok[:, None], t + i, axis=1)
        return i + 1, buf, out, ent, done, lengths

    state = (jnp.int32(0), buf, out, ent, done, lengths)
    _, _, out, ent, _, lengths = lax.while_loop(cond, body, state)
    return Generation(out, lengths, ent)


def _default_length_buckets(max_len: int) -> tuple[int, ...]:
    buckets, size = [], 16
    while size < max_len:
        buckets.append(size)
        size *= 2
    return tuple(buckets) + (max_len,)


def _bucket(size: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if size <= b:
            return b
    raise ValueError(f"{what} {size} exceeds the largest bucket {max(buckets)} (buckets: "
                     f"{tuple(buckets)}; the KV cache also holds max_new_tokens)")


class Generator:
    """Host-side batched generation with (batch, length) buckets.

    Prompts are token lists of any length; a call pads the batch up to the next batch bucket
    (splitting batches beyond the largest one) and left-pads every prompt up to the next length
    bucket, so `generate_padded` compiles once per (mode, batch bucket, length bucket) and is
    reused by every later call in that bucket. Sampling settings, EOS and the RNG are traced.

    cfg: the model config; params: its params (already on device, e.g. restored onto their
    logical shardings); max_new_tokens: N; the KV cache holds length bucket + N positions, at
    most cfg.max_len. mesh: when given, each batch is placed with its batch axis split over the
    mesh's (data, fsdp) axes (batch buckets become multiples of their size); the computation
    then follows the params' and the batch's shardings.
    """

    def __init__(self, cfg: ModelConfig, params, *, eos_id: int, pad_id: int = 0,
                 max_new_tokens: int = 32, batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
                 length_buckets: Sequence[int] | None = None, adapter: str | None = "generator",
                 use_cache: bool = True, mesh=None):
        if max_new_tokens <= 0 or max_new_tokens >= cfg.max_len:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be in [1, model.max_len="
                             f"{cfg.max_len})")
        self.cfg, self.params = cfg, params
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        self.max_new_tokens = int(max_new_tokens)
        self.mesh = mesh
        per = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        # On a mesh the batch axis is split over (data, fsdp): buckets are multiples of that.
        self.batch_buckets = tuple(sorted({-(-b // per) * per for b in batch_buckets}))
        limit = cfg.max_len - self.max_new_tokens
        buckets = length_buckets or _default_length_buckets(limit)
        self.length_buckets = tuple(sorted(b for b in buckets if b <= limit))
        if not self.length_buckets:
            raise ValueError(f"no length bucket fits model.max_len={cfg.max_len} with "
                             f"max_new_tokens={max_new_tokens}")
        self.adapter = adapter
        self._fn = generate_padded if use_cache else generate_recompute

    def pad(self, prompts: Sequence[Sequence[int]], slots: Sequence[Sequence[bool]] | None,
            latents: np.ndarray | None):
        """Left-pads `prompts` into one bucket. Returns numpy (tokens int32[Bb, Tb],
        mask bool[Bb, Tb], slot_mask bool[Bb, Tb] or None, latents float[Bb, K, M, L] or None)
        with Bb, Tb the bucket sizes."""
        b = len(prompts)
        bb = _bucket(b, self.batch_buckets, "batch size")
        longest = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("an empty prompt cannot be continued; give at least one token")
        tb = _bucket(longest, self.length_buckets, "prompt length")
        tokens = np.full((bb, tb), self.pad_id, np.int32)
        mask = np.zeros((bb, tb), bool)
        slot_mask = None if latents is None else np.zeros((bb, tb), bool)
        for i, p in enumerate(prompts):
            tokens[i, tb - len(p):] = np.asarray(p, np.int32)
            mask[i, tb - len(p):] = True
            if slot_mask is not None:
                s = np.asarray(slots[i], bool)
                if s.shape != (len(p),):
                    raise ValueError(f"prompt {i}: slot mask has shape {s.shape}, tokens "
                                     f"({len(p)},)")
                slot_mask[i, tb - len(p):] = s
        lat = None
        if latents is not None:
            latents = np.asarray(latents)
            lat = np.zeros((bb,) + latents.shape[1:], latents.dtype)
            lat[:b] = latents
        return tokens, mask, slot_mask, lat

    def __call__(self, prompts: Sequence[Sequence[int]], *,
                 slots: Sequence[Sequence[bool]] | None = None, latents=None,
                 sampling: Sampling = GREEDY, rng=None) -> Generation:
        """prompts: B token lists; in latent mode slots: B bool lists (True where a latent goes,
        K·M per prompt, in order) and latents: float[B, K, M, L]. rng: a key (default key(0));
        chunk c of a large batch uses fold_in(rng, c). Returns a numpy `Generation` with B rows.
        """
        if not prompts:
            raise ValueError("no prompts given")
        if (slots is None) != (latents is None):
            raise ValueError("latent mode needs both slots and latents")
        if latents is not None and len(latents) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but latents for {len(latents)}")
        rng = jax.random.key(0) if rng is None else rng
        step = self.batch_buckets[-1]
        parts = []
        for c, start in enumerate(range(0, len(prompts), step)):
            chunk = slice(start, start + step)
            tokens, mask, slot_mask, lat = self.pad(
                prompts[chunk], None if slots is None else slots[chunk],
                None if latents is None else latents[chunk])
            if self.mesh is not None:
                tokens, mask, slot_mask, lat = (
                    None if a is None else jax.device_put(a, batch_sharding(self.mesh, a.ndim))
                    for a in (tokens, mask, slot_mask, lat))
            res = self._fn(self.cfg, self.params, tokens, mask, slot_mask, lat,
                           jax.random.fold_in(rng, c) if c else rng, np.int32(self.eos_id),
                           np.int32(self.pad_id), sampling.as_arrays(),
                           max_new_tokens=self.max_new_tokens, adapter=self.adapter)
            n = len(prompts[chunk])
            parts.append(Generation(*(np.asarray(a)[:n] for a in res)))
        return Generation(*(np.concatenate(a) for a in zip(*parts)))


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, eos_id: int,
             max_new_tokens: int = 32, pad_id: int = 0,
             slots: Sequence[Sequence[bool]] | None = None, latents=None,
             sampling: Sampling = GREEDY, rng=None, adapter: str | None = "generator",
             **bucket_options) -> Generation:
    """One-call generation: `Generator(cfg, params, ...)(prompts, ...)`. The compiled programs
    live in the jit cache, so repeated calls within a bucket do not recompile.

    prompts: B token lists; slots / latents: see `Generator.__call__`. -> numpy `Generation`
    with tokens int32[B, N], lengths int32[B], entropy float32[B, N].
    """
    gen = Generator(cfg, params, eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens,
                    adapter=adapter, **bucket_options)
    return gen(prompts, slots=slots, latents=latents, sampling=sampling, rng=rng)


def answer_entropy(gen: Generation, num_tokens: int) -> np.ndarray:
    """The mean next-token entropy over each row's first `num_tokens` generated positions (the
    EOS position included, so an immediately stopping row still has one value).
    gen: a numpy Generation -> float32[B]."""
    n = np.minimum(np.asarray(gen.lengths) + 1, min(num_tokens, gen.entropy.shape[1]))
    cols = np.arange(gen.entropy.shape[1])[None] < n[:, None]
    return (np.sum(np.where(cols, gen.entropy, 0.0), axis=1) / np.maximum(n, 1)).astype(
        np.float32)


def trace_count(name: str = "generate_padded") -> int:
    """How many times `name` ('generate_padded' or 'generate_recompute') has been traced."""
    return TRACE_COUNTS[name]


__all__ = ["GREEDY", "Generation", "Generator", "Sampling", "answer_entropy",
           "generate", "generate_padded", "generate_recompute", "sample_next", "trace_count"]
