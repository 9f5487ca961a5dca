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


def _preds(ems):
    return [{"line": i, "scores": {"em": float(e)}} for i, e in enumerate(ems)]


@pytest.mark.parametrize("latent,closed,only,p", [
    ([1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 0], (4, 0), 0.125),  # 2 * (1/2)^4
    ([1, 0, 1, 0], [0, 1, 0, 1], (2, 2), 1.0),
    ([0, 0], [0, 0], (0, 0), 1.0),
    ([1] * 10 + [0], [0] * 10 + [1], (10, 1), 2 * 12 / 2 ** 11),  # (C(11,0) + C(11,1)) / 2^11
    ([1] * 43, [0] * 43, (43, 0), 2 / 2 ** 43),
])
def test_paired_em_counts_discordant_questions_and_sign_test(latent, closed, only, p):
    from clara_jax.eval.report import paired_em

    out = paired_em({"latent": _preds(latent), "closed_book": _preds(closed)}, "latent",
                    "closed_book")
    assert (out["only_latent_rag"], out["only_closed_book"]) == only
    assert out["sign_test_p"] == pytest.approx(p, rel=1e-5)


def test_paired_em_refuses_predictions_of_other_questions():
    from clara_jax.eval.report import paired_em

    other = _preds([1, 0])
    other[1]["line"] = 7
    with pytest.raises(ValueError, match="same questions"):
        paired_em({"latent": _preds([1, 0]), "text": other}, "latent", "text")
