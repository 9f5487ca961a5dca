"""EM, F1 and cover-EM with the SQuAD answer normalisation, and Recall@k.

Each answer metric takes one prediction and the list of acceptable gold answers and returns the
best score over the golds, as the SQuAD and CLaRa evaluations do.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, white space collapsed (SQuAD v1.1)."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    pred = normalize_answer(prediction).split()
    return max((_f1(pred, normalize_answer(g).split()) for g in golds), default=0.0)


def cover_exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1 when some normalised gold answer appears in the normalised prediction (as whole
    words), the paper's cover-EM."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(g) and f" {normalize_answer(g)} " in pred for g in golds))


def recall_at_k(retrieved: Sequence, relevant: Iterable, k: int) -> float:
    """1 when any relevant item is among the first k retrieved, else 0."""
    relevant = set(relevant)
    return float(any(r in relevant for r in list(retrieved)[:k]))


def answer_scores(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    return {"em": exact_match(prediction, golds), "f1": f1_score(prediction, golds),
            "cover_em": cover_exact_match(prediction, golds)}


def mean_scores(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    """Per-key means over rows of scores (keys absent from a row are not counted for it)."""
    sums: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for row in rows:
        for key, value in row.items():
            sums[key] += value
            counts[key] += 1
    return {key: sums[key] / counts[key] for key in sums}
