"""The training losses against small hand-computed cases."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clara_jax.losses import (
    cosine_scores,
    differentiable_topk,
    in_batch_info_nce,
    info_nce,
    mse_alignment,
    retrieval_alignment_loss,
    span_readout_loss,
    token_cross_entropy,
)


def test_token_cross_entropy_masked_mean():
    # Row 0: uniform over 4 -> ln 4. Row 0 pos 1: p(target=1) = 3/4. Row 1: masked out, even
    # though its logits are extreme.
    logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9]],
                        [[1e4, 0.0, 0.0, 0.0], [1e4, 0.0, 0.0, 0.0]]])
    targets = jnp.array([[2, 1], [3, 3]], jnp.int32)
    mask = jnp.array([[True, True], [False, False]])
    loss, n = token_cross_entropy(logits, targets, mask)
    assert float(n) == 2.0
    np.testing.assert_allclose(float(loss), (math.log(4.0) - math.log(0.75)) / 2, rtol=1e-6)


def test_token_cross_entropy_empty_mask_is_zero_not_nan():
    loss, n = token_cross_entropy(jnp.zeros((1, 3, 5)), jnp.zeros((1, 3), jnp.int32),
                                  jnp.zeros((1, 3), bool))
    assert float(loss) == 0.0 and float(n) == 0.0


def test_mse_alignment_hand_case_and_valid_rows():
    doc = jnp.array([[1.0, 2.0], [5.0, 5.0]])
    mem = jnp.array([[0.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(float(mse_alignment(doc, mem, jnp.array([True, False]))), 2.5)
    np.testing.assert_allclose(float(mse_alignment(doc, mem)), (2.5 + 25.0) / 2)


def test_cosine_scores_flatten_latents():
    q = jnp.array([[[1.0, 0.0], [0.0, 0.0]]])  # [B=1, M=2, L=2]
    cands = jnp.array([[[[2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]],
                        [[1.0, 0.0], [1.0, 0.0]]]])  # [1, C=3, 2, 2]
    np.testing.assert_allclose(np.asarray(cosine_scores(q, cands)),
                               [[1.0, 0.0, 1 / math.sqrt(2)]], atol=1e-6)


def test_differentiable_topk_forward_is_hard_topk_in_order():
    scores = jnp.array([[0.1, 0.9, 0.5, 0.3], [0.4, 0.2, 0.3, 0.8]])
    w = differentiable_topk(scores, 3, tau=0.5)
    assert w.shape == (2, 3, 4)
    np.testing.assert_array_equal(np.asarray(w).argmax(-1), [[1, 2, 3], [3, 0, 2]])
    np.testing.assert_allclose(np.asarray(w).max(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)


def test_differentiable_topk_invalid_candidates_never_picked():
    scores = jnp.array([[0.9, 0.1, 0.8]])
    w = differentiable_topk(scores, 2, tau=0.1, valid=jnp.array([[False, True, True]]))
    np.testing.assert_array_equal(np.asarray(w).argmax(-1), [[2, 1]])


@pytest.mark.parametrize("tau", [0.02, 1.0])
def test_differentiable_topk_backward_is_softmax_over_scores_over_tau(tau):
    # A tie: soft = [1/2, 1/2]; d W[0, 0] / d s0 = (1/tau) * p0 * (1 - p0) = 0.25 / tau,
    # d W[0, 0] / d s1 = -0.25 / tau. Slot 1 has one candidate left: a constant softmax.
    g = jax.grad(lambda s: differentiable_topk(s, 2, tau)[0, 0, 0])(jnp.array([[0.0, 0.0]]))
    np.testing.assert_allclose(np.asarray(g), [[0.25 / tau, -0.25 / tau]], rtol=1e-5)
    g1 = jax.grad(lambda s: differentiable_topk(s, 2, tau)[0, 1].sum())(jnp.array([[0.0, 0.0]]))
    np.testing.assert_allclose(np.asarray(g1), 0.0, atol=1e-7)


def test_differentiable_topk_backward_sequential_path():
    # Slot 1 picks among candidates other than slot 0's hard pick: its gradient is that of a
    # softmax over the remaining scores (hand-computed with numpy).
    s = np.array([[2.0, 1.0, 0.0]])
    tau = 1.0
    gvec = np.array([0.3, -1.0, 2.0])  # upstream gradient on W[0, 1, :]
    got = jax.grad(lambda x: jnp.sum(differentiable_topk(x, 2, tau)[0, 1] * gvec))(
        jnp.asarray(s))
    rest = np.exp(s[0, 1:]) / np.exp(s[0, 1:]).sum()  # softmax over candidates 1, 2
    g_rest = gvec[1:]
    expect = np.zeros(3)
    expect[1:] = rest * (g_rest - (rest * g_rest).sum()) / tau
    np.testing.assert_allclose(np.asarray(got)[0], expect, rtol=1e-5, atol=1e-7)


def test_selected_latents_forward_equals_gather():
    scores = jnp.array([[0.1, 0.9, 0.5]])
    cands = jnp.arange(3 * 2 * 2, dtype=jnp.float32).reshape(1, 3, 2, 2)
    w = differentiable_topk(scores, 2, 0.02)
    sel = jnp.einsum("bkc,bcml->bkml", w, cands)
    np.testing.assert_allclose(np.asarray(sel), np.asarray(cands[:, [1, 2]]), atol=1e-6)


def test_retrieval_alignment_zero_at_target_and_gradient_direction():
    utility = jnp.array([[3.0, 1.0]])  # standardised -> [1, -1]
    tau = 0.5
    at_target = jnp.array([[0.5, -0.5]])  # scores / tau = [1, -1]
    np.testing.assert_allclose(float(retrieval_alignment_loss(at_target, utility, tau)), 0.0,
                               atol=1e-6)
    # Retriever too sure of candidate 1 (the less useful): the gradient raises score 0 and
    # lowers score 1; none reaches the utility.
    wrong = jnp.array([[0.0, 1.0]])
    gs, gu = jax.grad(retrieval_alignment_loss, argnums=(0, 1))(wrong, utility, tau)
    assert gs[0, 0] < 0 < gs[0, 1]
    np.testing.assert_array_equal(np.asarray(gu), 0.0)
    # Hand value: KL(t || p) with t = softmax([1, -1]), p = softmax([0, 2]).
    t = np.exp([1.0, -1.0]) / np.exp([1.0, -1.0]).sum()
    p = np.exp([0.0, 2.0]) / np.exp([0.0, 2.0]).sum()
    np.testing.assert_allclose(float(retrieval_alignment_loss(wrong, utility, tau)),
                               float(np.sum(t * np.log(t / p))), rtol=1e-5)


def test_retrieval_alignment_ignores_invalid_candidates():
    utility = jnp.array([[3.0, 1.0, 100.0]])
    scores = jnp.array([[0.5, -0.5, 9.0]])
    valid = jnp.array([[True, True, False]])
    np.testing.assert_allclose(
        float(retrieval_alignment_loss(scores, utility, 0.5, valid=valid)), 0.0, atol=1e-6)


def test_info_nce_hand_case():
    tau = 0.5
    cands = jnp.eye(3).reshape(1, 3, 1, 3).repeat(2, axis=0)  # orthogonal candidates
    query = cands[:, 1]  # the positive is candidate 1 (cos 1), the others cos 0
    loss, n = info_nce(query, cands, jnp.array([1, -1]), tau)
    assert float(n) == 1.0
    expect = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2.0))
    np.testing.assert_allclose(float(loss), expect, rtol=1e-5)


def test_in_batch_info_nce_skips_copies_of_the_gold_document():
    tau = 0.5
    docs = jnp.eye(3).reshape(3, 1, 3)  # orthogonal documents
    tokens = jnp.array([[5, 6], [7, 8], [5, 6]])  # documents 0 and 2 are one document twice
    docs = docs.at[2].set(docs[0])
    query = jnp.stack([docs[0], docs[1], docs[1]])
    loss, recall = in_batch_info_nce(query, docs, tokens, jnp.array([0, 1, -1]), tau)
    # Row 0: the copy (document 2) is not a negative, so only document 1 (cos 0) competes.
    row0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 1.0))
    # Row 1: documents 0 and 2 both compete at cos 0. Row 2 has no question.
    row1 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2.0))
    np.testing.assert_allclose(float(loss), (row0 + row1) / 2, rtol=1e-5)
    assert float(recall) == 1.0
    _, recall = in_batch_info_nce(query, docs, tokens, jnp.array([1, 0, -1]), tau)
    assert float(recall) == 0.0


def test_span_readout_hand_case_orders_each_latents_tokens_and_skips_padding():
    # 2 latents x 2 sub-positions over a vocabulary of 3; document tokens [2, 0, 1, x].
    logits = jnp.full((1, 2, 2, 3), -30.0)
    logits = logits.at[0, 0, 0, 2].set(0.0).at[0, 0, 1, 0].set(0.0).at[0, 1, 0, 1].set(0.0)
    doc = jnp.asarray([[2, 0, 1, 1]])
    mask = jnp.asarray([[True, True, True, False]])
    assert float(span_readout_loss(logits, doc, mask)) < 1e-6
    # The same tokens in another order within a latent are wrong: ~30 nats for those two.
    swapped = jnp.asarray([[0, 2, 1, 1]])
    assert float(span_readout_loss(logits, swapped, mask)) == pytest.approx(20.0, abs=1e-3)


def test_span_permutations_are_fixed_permutations_with_identity_first():
    from clara_jax.model.api import span_permutations

    p = np.asarray(span_permutations(16, 4))
    assert p.shape == (4, 16)
    np.testing.assert_array_equal(p[0], np.arange(16))
    for row in p[1:]:
        assert sorted(row.tolist()) == list(range(16))
        assert not np.array_equal(row, np.arange(16))
    np.testing.assert_array_equal(p, np.asarray(span_permutations(16, 4)))
