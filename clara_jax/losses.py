"""Losses of the three CLaRa training stages. Pure functions of arrays; shape letters as in
docs/design.md (B batch, T positions, V vocabulary, D width, C candidates, K documents used,
M memory tokens, L latent width).

- `token_cross_entropy`: masked next-token CE of the generator's answer.
- `mse_alignment`: stage-1 MSE between the mean document-token and mean memory-token hidden
  states.
- `cosine_scores`: retrieval scores between flattened M x L latents.
- `differentiable_topk`: hard top-k one-hot forward, sequential-softmax backward
  (straight-through).
- `retrieval_alignment_loss`: KL from the generator's use of each candidate to the
  retriever's softmax over candidates (see its docstring for the choice of "use").
- `info_nce`: contrastive loss for a supervised-retriever baseline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def token_cross_entropy(logits, targets, loss_mask):
    """Mean cross-entropy over the masked target positions.

    logits: float[B, T, V] (logits[:, t] predicts targets[:, t]); targets: int32[B, T];
    loss_mask: bool[B, T]. Returns (loss float32[], number of target tokens float32[]).
    A batch with no target token gives loss 0 (not NaN).
    """
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = loss_mask.astype(jnp.float32)
    n = jnp.sum(w)
    return jnp.sum((logz - picked) * w) / jnp.maximum(n, 1.0), n


def mse_alignment(doc_mean, mem_mean, valid=None):
    """Mean squared error between the mean document-token hidden state and the mean
    memory-token hidden state, averaged over D and over the valid rows.

    doc_mean, mem_mean: float[B, D]; valid: bool[B] (rows to count; all by default; empty
    padding documents are excluded by the caller). Returns float32[].
    """
    per_row = jnp.mean(jnp.square(doc_mean.astype(jnp.float32) - mem_mean.astype(jnp.float32)),
                       axis=-1)
    if valid is None:
        return jnp.mean(per_row)
    w = valid.astype(jnp.float32)
    return jnp.sum(per_row * w) / jnp.maximum(jnp.sum(w), 1.0)


def span_readout_loss(span_logits, doc_tokens, doc_mask):
    """Cross-entropy of each latent's guess of the R framed document tokens it stands for:
    latent j names tokens j·R .. j·R + R - 1, in order (`model.latent_span_logits`).

    The generator learns to read latents only once they say something, and the compressor
    learns to write only what the generator reads: from random init the two wait on each other
    (`bench/channel.py`; each half alone, against a fixed partner, learns several times faster:
    projects/channel/README.md). This loss gives the compressor a signal of its own, and a
    span per latent by construction, so that no part of the document is left to no latent.

    span_logits: float[B, M, R, V]; doc_tokens: int32[B, M·R]; doc_mask: bool[B, M·R]
    -> float32[] (mean over the valid document tokens).
    """
    b, m, r, v = span_logits.shape
    logits = span_logits.reshape(b, m * r, v).astype(jnp.float32)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), doc_tokens[..., None],
                              axis=-1)[..., 0]
    w = doc_mask.astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def _normalize(x, eps: float = 1e-6):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_scores(query_latents, cand_latents):
    """Cosine similarity of the flattened latents.

    query_latents: float[B, M, L]; cand_latents: float[B, C, M, L] -> float32[B, C].
    """
    b, c = cand_latents.shape[:2]
    q = _normalize(query_latents.reshape(b, -1))
    d = _normalize(cand_latents.reshape(b, c, -1))
    return jnp.einsum("bx,bcx->bc", q, d)


def differentiable_topk(scores, k: int, tau: float, valid=None):
    """Straight-through top-k selection weights.

    For slot i = 0..k-1: soft_i = softmax(scores / tau) over the candidates not yet picked by
    slots < i (picked = the hard choices), hard_i = one-hot(argmax soft_i). The result is
    W_i = hard_i + soft_i - stop_gradient(soft_i): exactly the hard top-k one-hot in the
    forward pass (slot i holds the i-th best candidate), the sequential softmax's gradient in
    the backward pass.

    scores: float[B, C]; valid: bool[B, C] (False candidates are never picked; each row needs at
    least k valid ones) -> W float32[B, k, C].
    """
    s = scores.astype(jnp.float32) / tau
    if valid is not None:
        s = jnp.where(valid, s, NEG_INF)
    taken = jnp.zeros(s.shape, bool)
    rows = []
    for _ in range(k):
        soft = jax.nn.softmax(jnp.where(taken, NEG_INF, s), axis=-1)
        hard = jax.nn.one_hot(jnp.argmax(jnp.where(taken, NEG_INF, s), axis=-1), s.shape[-1],
                              dtype=jnp.float32)
        rows.append(hard + soft - jax.lax.stop_gradient(soft))
        taken = taken | (hard > 0)
    return jnp.stack(rows, axis=1)


def retrieval_alignment_loss(scores, utility, tau: float, align_tau: float = 1.0, valid=None,
                             rows=None):
    """KL(target || retriever): pulls the retriever's distribution over candidates toward the
    generator's use of each candidate.

    The retriever's distribution is softmax(scores / tau). The generator's use of a candidate
    is given by `utility` (higher = more useful), which the caller computes with the
    generator's own signal; the trainer uses the first-order estimate
    u_c = -mean_k <dCE/d selected_k, latents_c>: how much the answer's loss would fall if
    candidate c took the place of what the generator read in each slot (defined for every
    candidate, selected or not, unlike attention mass, which only exists for the K read).
    The utility is standardised per row (so its scale does not depend on the loss's) and
    the target is softmax(u_std / align_tau); gradients reach only the retriever.

    scores, utility: float[B, C]; valid: bool[B, C]; rows: bool[B], the rows to count (all by
    default; a text row, whose generator read no latents, has no utility) -> float32[] (mean
    over the rows counted, 0 when there are none).
    """
    u = jax.lax.stop_gradient(utility.astype(jnp.float32))
    s = scores.astype(jnp.float32) / tau
    if valid is None:
        valid = jnp.ones(s.shape, bool)
    w = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1.0)
    mean = jnp.sum(u * w, axis=-1, keepdims=True) / n
    std = jnp.sqrt(jnp.sum(jnp.square(u - mean) * w, axis=-1, keepdims=True) / n)
    u_std = (u - mean) / (std + 1e-6)
    log_target = jax.nn.log_softmax(jnp.where(valid, u_std / align_tau, NEG_INF), axis=-1)
    log_p = jax.nn.log_softmax(jnp.where(valid, s, NEG_INF), axis=-1)
    target = jnp.exp(log_target)
    kl = jnp.sum(jnp.where(valid, target * (log_target - log_p), 0.0), axis=-1)
    if rows is None:
        return jnp.mean(kl)
    w_rows = rows.astype(jnp.float32)
    return jnp.sum(jnp.where(rows, kl, 0.0)) / jnp.maximum(jnp.sum(w_rows), 1.0)


def in_batch_info_nce(query_latents, doc_latents, doc_tokens, positive, tau: float):
    """InfoNCE of each question against every document of the batch: the row's gold document
    is the positive, the others (except copies of the gold document, which stage-1 batches
    hold when several questions share a document) are negatives.

    query_latents: float[B, M, L]; doc_latents: float[N, M, L]; doc_tokens: int32[N, Td] (to
    find copies); positive: int32[B], an index into N (-1 = no question, row ignored).
    Returns (loss float32[], in-batch recall@1 float32[]).
    """
    n = doc_latents.shape[0]
    pos = jnp.maximum(positive, 0)
    same = jnp.all(doc_tokens[:, None, :] == doc_tokens[None, :, :], axis=-1)  # [N, N]
    valid = ~same[pos] | (jnp.arange(n)[None, :] == pos[:, None])  # [B, N]
    q = _normalize(query_latents.reshape(query_latents.shape[0], -1))
    d = _normalize(doc_latents.reshape(n, -1))
    scores = jnp.where(valid, q @ d.T, NEG_INF)  # each document normalised once, not per row
    loss, _ = _nce(scores / tau, positive)
    has = positive >= 0
    hit = (jnp.argmax(scores, axis=-1) == positive) & has
    recall = jnp.sum(hit) / jnp.maximum(jnp.sum(has), 1)
    return loss, recall.astype(jnp.float32)


def _nce(logits, pos_index):
    """Mean over rows with pos_index >= 0 of -log softmax(logits)[pos]: (loss, rows used)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    has = pos_index >= 0
    picked = jnp.take_along_axis(logp, jnp.maximum(pos_index, 0)[:, None], axis=-1)[:, 0]
    n = jnp.sum(has.astype(jnp.float32))
    return -jnp.sum(jnp.where(has, picked, 0.0)) / jnp.maximum(n, 1.0), n


def info_nce(query_latents, cand_latents, pos_index, tau: float, valid=None):
    """InfoNCE over the candidates with the known positive `pos_index` (supervised retriever
    baseline): mean over rows with pos_index >= 0 of -log softmax(cos / tau)[pos].

    query_latents: float[B, M, L]; cand_latents: float[B, C, M, L]; pos_index: int32[B]
    (-1 = unknown, row ignored); valid: bool[B, C]. Returns (loss float32[], rows used float32[]).
    """
    s = cosine_scores(query_latents, cand_latents) / tau
    if valid is not None:
        s = jnp.where(valid, s, NEG_INF)
    return _nce(s, pos_index)
