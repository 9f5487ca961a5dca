"""Answer metrics against hand-computed SQuAD-style cases, and Recall@k."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clara_jax.eval.metrics import (
    answer_scores,
    cover_exact_match,
    exact_match,
    f1_score,
    mean_scores,
    normalize_answer,
    recall_at_k,
)


@pytest.mark.parametrize("text,expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   apple, a pear  ", "apple pear"),
    ("Theodore's theme", "theodores theme"),  # 'the' inside a word stays
    ("", ""),
])
def test_normalize(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_takes_the_best_gold():
    assert exact_match("the Paris", ["London", "Paris."]) == 1.0
    assert exact_match("Paris France", ["Paris"]) == 0.0


def test_f1_hand_computed():
    # pred {paris, in, france}, gold {paris, france}: P = 2/3, R = 1, F1 = 0.8
    assert f1_score("Paris in France", ["Paris, France"]) == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred {a1 a1 b}, gold {a1 b b}: common 2
    assert f1_score("x x y", ["x y y"]) == pytest.approx(2 / 3)
    assert f1_score("nothing", ["else"]) == 0.0
    assert f1_score("the", ["a"]) == 1.0  # both normalise to empty


def test_cover_em_needs_whole_words():
    assert cover_exact_match("It was built in 1889 by Eiffel.", ["1889"]) == 1.0
    assert cover_exact_match("In 18890", ["1889"]) == 0.0
    assert cover_exact_match("anything", [""]) == 0.0


def test_recall_at_k():
    assert recall_at_k([4, 2, 9], {2}, 1) == 0.0
    assert recall_at_k([4, 2, 9], {2}, 2) == 1.0
    assert recall_at_k(["d1", "d2"], ["d3"], 5) == 0.0


def test_mean_scores_counts_present_keys_only():
    rows = [answer_scores("a b", ["a b"]), {"em": 0.0, "f1": 0.5, "recall_at_5": 1.0}]
    means = mean_scores(rows)
    assert means["em"] == 0.5 and means["f1"] == 0.75 and means["recall_at_5"] == 1.0
    assert means["cover_em"] == 1.0


@given(st.text(), st.lists(st.text(), min_size=1, max_size=3))
def test_metric_bounds_and_order(pred, golds):
    s = answer_scores(pred, golds)
    assert all(0.0 <= v <= 1.0 for v in s.values())
    if s["em"] == 1.0:
        assert s["f1"] == 1.0
        assert s["cover_em"] == 1.0 or normalize_answer(pred) == ""
