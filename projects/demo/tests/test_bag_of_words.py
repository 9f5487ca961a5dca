"""The demo's bag-of-words loss (projects/demo/bag_of_words.py), moved with its code from
tests/test_losses.py."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from projects.demo.bag_of_words import bag_of_words_loss


def test_bag_of_words_hand_case_pools_memory_tokens_and_skips_padding():
    # Row 0 holds tokens {1, 2} (2 twice, 3 only under padding): target 1/2 on each. Memory
    # token 0 names token 1 and memory token 1 names token 2, so the pooled (log-sum-exp)
    # logits are [0, 5, 5, ln 2] and each present token gets 5 - ln(1 + 2 e^5 + 2).
    logits = jnp.array([[[0.0, 5.0, -1e9, 0.0], [-1e9, -1e9, 5.0, 0.0]],
                        [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    tokens = jnp.array([[1, 2, 2, 3], [0, 0, 0, 0]], jnp.int32)
    mask = jnp.array([[True, True, True, False], [False, False, False, False]])
    expected = -(5.0 - math.log(1.0 + 2.0 * math.exp(5.0) + 2.0))
    np.testing.assert_allclose(float(bag_of_words_loss(logits, tokens, mask)), expected,
                               rtol=1e-6)  # row 1 has no valid token and is not counted
    # Naming a token the document lacks costs more than naming the ones it has.
    wrong = logits.at[0, 1].set(jnp.array([-1e9, -1e9, -1e9, 5.0]))
    assert float(bag_of_words_loss(wrong, tokens, mask)) > expected + 1.0
