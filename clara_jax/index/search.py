"""Retrieval keys, exact search (the reference and fallback) and merging of top-k lists.

Keys follow the paper: the flattened M x L latents, L2-normalised, so a dot product is the
cosine similarity of the flattened latents (`flat`). The `mean` key averages the M vectors
first (width L), a smaller and faster key.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

KEY_TYPES = ("flat", "mean")


def key_width(key: str, m: int, latent_width: int) -> int:
    if key == "flat":
        return m * latent_width
    if key == "mean":
        return latent_width
    raise ValueError(f"key type {key!r}: must be one of {KEY_TYPES}")


def retrieval_keys(latents, key: str = "flat") -> np.ndarray:
    """latents: float[n, M, L] -> keys float32[n, K] with unit L2 norm (K = M*L or L)."""
    x = np.asarray(latents, np.float32)
    if x.ndim != 3:
        raise ValueError(f"latents must be float[n, M, L], got shape {x.shape}")
    if key == "flat":
        x = x.reshape(x.shape[0], x.shape[1] * x.shape[2])  # also for no rows
    elif key == "mean":
        x = x.mean(axis=1)
    else:
        raise ValueError(f"key type {key!r}: must be one of {KEY_TYPES}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    # A zero latent (never produced by a trained model) gets a zero key, not NaNs.
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("k",))
def _scan_block(queries, keys, valid, offset, best_scores, best_rows, k: int):
    """One block of the exact search: queries float32[Q, K], keys float32[R, K], valid
    bool[R]; merges the block's top-k into the running best (float32/int32[Q, k])."""
    scores = jnp.dot(queries, keys.T, precision=jax.lax.Precision.HIGHEST)
    scores = jnp.where(valid[None, :], scores, -jnp.inf)
    s, i = jax.lax.top_k(scores, k)
    all_s = jnp.concatenate([best_scores, s], axis=1)
    all_i = jnp.concatenate([best_rows, i.astype(jnp.int32) + offset], axis=1)
    top_s, pos = jax.lax.top_k(all_s, k)
    return top_s, jnp.take_along_axis(all_i, pos, axis=1)


class ExactSearcher:
    """Brute-force maximum inner product: a jitted matmul + top-k per block of keys.

    keys: float32[N, K] (unit norm); valid: bool[N] (False rows, e.g. deleted, never match).
    The keys live on the default device in fixed-size blocks (one compiled shape)."""

    def __init__(self, keys: np.ndarray, valid: np.ndarray | None = None,
                 block_rows: int = 131072):
        keys = np.asarray(keys, np.float32)
        n = keys.shape[0]
        valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
        self.num_rows, self.dim = n, keys.shape[1]
        self.num_valid = int(valid.sum())
        self.block = max(1024, min(block_rows, -(-n // 1024) * 1024))
        self.blocks = []
        for lo in range(0, max(n, 1), self.block):
            kb = np.zeros((self.block, self.dim), np.float32)
            vb = np.zeros(self.block, bool)
            part = keys[lo:lo + self.block]
            kb[:len(part)] = part
            vb[:len(part)] = valid[lo:lo + self.block]
            self.blocks.append((jnp.asarray(kb), jnp.asarray(vb), lo))

    def search(self, queries: np.ndarray, k: int, query_batch: int = 256):
        """queries: float32[Q, K] -> (rows int64[Q, k], scores float32[Q, k]); rows are -1 and
        scores -inf where fewer than k valid rows exist."""
        q_all = np.asarray(queries, np.float32)
        if q_all.ndim != 2 or q_all.shape[1] != self.dim:
            raise ValueError(f"queries must be float32[Q, {self.dim}], got {q_all.shape}")
        kk = min(k, self.block)
        rows_out, scores_out = [], []
        for qlo in range(0, q_all.shape[0], query_batch):
            q = q_all[qlo:qlo + query_batch]
            nq = q.shape[0]
            # Pad the query batch so every call has one shape (one compilation).
            qp = np.zeros((query_batch if q_all.shape[0] > query_batch else nq, self.dim),
                          np.float32)
            qp[:nq] = q
            qd = jnp.asarray(qp)
            best_s = jnp.full((qp.shape[0], kk), -jnp.inf, jnp.float32)
            best_i = jnp.full((qp.shape[0], kk), -1, jnp.int32)
            for kb, vb, lo in self.blocks:
                best_s, best_i = _scan_block(qd, kb, vb, jnp.int32(lo), best_s, best_i, k=kk)
            s = np.asarray(best_s)[:nq]
            r = np.asarray(best_i)[:nq].astype(np.int64)
            r[~np.isfinite(s)] = -1
            rows_out.append(r)
            scores_out.append(s)
        rows = np.concatenate(rows_out) if rows_out else np.zeros((0, kk), np.int64)
        scores = np.concatenate(scores_out) if scores_out else np.zeros((0, kk), np.float32)
        if kk < k:
            rows = np.pad(rows, ((0, 0), (0, k - kk)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
        return rows, scores


def merge_topk(parts, k: int):
    """Merges per-shard results into one top-k.

    parts: list of (rows int64[Q, k_i], scores float32[Q, k_i]) — one per shard, shard i
    being parts[i]. Returns (shard int64[Q, k], rows int64[Q, k], scores float32[Q, k]), in
    `merge_ranked`'s order: ties go to the lower shard, then the earlier rank."""
    shard = np.concatenate([np.full(np.shape(r), i, np.int64) for i, (r, _) in enumerate(parts)],
                           1)
    rows = np.concatenate([r for r, _ in parts], axis=1)
    scores = np.concatenate([s for _, s in parts], axis=1)
    return merge_ranked(shard, rows, scores, k)


def merge_ranked(shard, rows, scores, k: int):
    """The top-k of candidate lists, by score, then lower shard, then position.

    shard, rows: int64[Q, C]; scores: float32[Q, C] (-inf: no candidate). Each shard's
    candidates must appear in the shard's own rank order (they may be interleaved with other
    shards'). Returns (shard int64[Q, k], rows int64[Q, k], scores float32[Q, k]); -1 / -1 /
    -inf where fewer than k candidates exist.

    The order is total, so merging in two levels (each host merges its shards, then the
    hosts' lists are merged; `clara_jax.index.multihost`) gives what one merge of every
    shard gives: a candidate of the overall top-k is in its host's top-k under the same
    order."""
    shard = np.asarray(shard, np.int64)
    rows = np.asarray(rows, np.int64)
    scores = np.asarray(scores, np.float32)
    # lexsort is stable and sorts by its last key first: score descending, then shard; equal
    # (score, shard) keep their given order, which is the shard's rank order.
    order = np.lexsort((shard, -scores), axis=1)[:, :k]
    take = lambda a: np.take_along_axis(a, order, axis=1)
    s, r, sh = take(scores), take(rows), take(shard)
    missing = ~np.isfinite(s)
    r[missing], sh[missing] = -1, -1
    if s.shape[1] < k:
        pad = ((0, 0), (0, k - s.shape[1]))
        sh = np.pad(sh, pad, constant_values=-1)
        r = np.pad(r, pad, constant_values=-1)
        s = np.pad(s, pad, constant_values=-np.inf)
    return sh, r, s
