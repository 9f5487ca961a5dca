"""Counterfactual answers for the demo's training split (`demo.swap_answers`): a small
generator trained on one fixed world learns its facts by heart and answers without reading its
documents; with the answer swapped in the documents and the target alike, the documents are
the only source of the answer (projects/demo/README.md). Used through the library loader's
`augment` (`clara_jax.data.pipeline.make_loader`).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from clara_jax.data.featurize import as_text, as_texts

_CAPITALISED_OR_NUMBER = re.compile(r"\b(?:[A-Z][\w'-]*|\d[\d,.]*)")


def question_kind(question: str) -> str:
    """What a question asks, without whom it asks about: its words, lower-cased, with
    capitalised words (after the first) and numbers removed. "What is the capital of Mochakora?"
    and "What is the capital of Trastolora?" are one kind."""
    first, _, rest = question.strip().partition(" ")
    rest = _CAPITALISED_OR_NUMBER.sub("", rest)
    return " ".join(f"{first} {rest}".lower().split())


def _mentions(answer: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(answer) + r"(?!\w)")


@dataclasses.dataclass
class AnswerSwap:
    """Counterfactual answers: with probability `rate`, an example's answer is replaced, in
    every one of its documents and in its target, by the answer of a random example of the
    same kind of question (`question_kind`) from the same split. A generator trained on a
    fixed world otherwise learns its facts by heart and answers without reading its
    documents; after a swap the documents are the only source of the answer, while the
    answers' distribution per kind of question stays that of the data (drawn with their
    frequencies). Examples whose answer is not in their documents, paraphrases, and kinds
    with a single distinct answer are left as they are.

    pools: kind -> the answers of all its examples, sorted (repeats kept).
    """

    rate: float
    pools: dict[str, list[str]]

    @classmethod
    def from_source(cls, source, rate: float) -> AnswerSwap:
        """Pools from every example of a TFDS source (one pass over its questions)."""
        pools: dict[str, list[str]] = {}
        for i in range(len(source)):
            ex = source[i]
            if as_text(ex.get("data_type", "qa")) != "qa":
                continue
            pools.setdefault(question_kind(as_text(ex["question"])), []).append(
                as_text(ex["answer"]))
        return cls(rate, {k: sorted(v) for k, v in pools.items() if len(set(v)) > 1})

    def __call__(self, ex: dict, rng: np.random.Generator) -> dict:
        if as_text(ex.get("data_type", "qa")) != "qa" or rng.random() >= self.rate:
            return ex
        pool = self.pools.get(question_kind(as_text(ex["question"])))
        answer = as_text(ex["answer"])
        key = "doc" if "doc" in ex else "docs"
        docs = [as_text(ex["doc"])] if key == "doc" else as_texts(ex["docs"])
        found = _mentions(answer)
        if not pool or not any(found.search(d) for d in docs):
            return ex
        # A substitute that the documents do not already mention, so the answer stays unique.
        for _ in range(8):
            new = pool[int(rng.integers(len(pool)))]
            if new != answer and not any(_mentions(new).search(d) for d in docs):
                break
        else:
            return ex
        docs = [found.sub(lambda _: new, d) for d in docs]
        out = dict(ex, answer=new)
        out[key] = docs[0] if key == "doc" else docs
        return out


def answer_swaps(rate: float):
    """The loader's `augment` for `rate` (None for 0: no swaps)."""
    if rate <= 0:
        return None
    return lambda source: AnswerSwap.from_source(source, rate)
