"""The demo's counterfactual answers (projects/demo/answer_swap.py), moved here with their
code from tests/test_data_pipeline.py: question kinds, the swap itself, and the loader's
`augment` applying it to the training split only, seeded."""

from __future__ import annotations

import numpy as np

from clara_jax.data import featurize, pipeline, tfds_build
from projects.demo.answer_swap import AnswerSwap, _mentions, answer_swaps, question_kind
from tests.world_support import single_process_loader

_loader = single_process_loader


def test_question_kind_drops_whom_it_asks_about():
    kind = question_kind
    assert kind("What is the capital of Mochakora?") == "what is the capital of ?"
    assert kind("What is the capital of Trastolora?") == kind("What is the capital of X?")
    assert kind("In which year was the founder of Zeibrem Guild born?") == \
        "in which year was the founder of born?"
    assert kind("How many people work at Fasiath?") != kind("How many people live in Fasiath?")


def test_answer_swap_rewrites_documents_and_answer_alike(built):
    out, _ = built
    source = tfds_build.data_source("stage1", out, "train")
    swap = AnswerSwap.from_source(source, 1.0)
    rng = np.random.default_rng(0)
    swapped = 0
    for i in range(len(source)):
        ex = source[i]
        new = swap(ex, rng)
        if featurize.as_text(ex["data_type"]) != "qa":
            assert new is ex  # paraphrases are left alone
            continue
        old_answer, answer = featurize.as_text(ex["answer"]), featurize.as_text(new["answer"])
        if answer == old_answer:
            continue
        swapped += 1
        kind = question_kind(featurize.as_text(ex["question"]))
        assert answer in swap.pools[kind] and old_answer in swap.pools[kind]
        assert _mentions(answer).search(new["doc"])
        assert not _mentions(old_answer).search(new["doc"])
        # Only the answer's mentions changed.
        assert new["doc"].replace(answer, "#") == \
            featurize.as_text(ex["doc"]).replace(old_answer, "#")
    assert swapped > len(source) // 2
    # Substitutes come with the frequencies of the data's own answers to that kind.
    kind = "when was born?"
    answers = [featurize.as_text(source[i]["answer"]) for i in range(len(source))
               if question_kind(featurize.as_text(source[i]["question"])) == kind]
    assert swap.pools[kind] == sorted(answers) and len(set(answers)) < len(answers)
    ex = source[0]
    assert AnswerSwap(0.0, swap.pools)(ex, rng) is ex


def test_swapped_answers_are_read_from_the_documents(built, tiny_config):
    out, _ = built
    c = tiny_config
    tok = pipeline.load_data_tokenizer(out)
    plain, swapped = _loader(tiny_config, 2, out), _loader(c, 2, out, augment=answer_swaps(1.0))
    def answer_and_docs(batch, i):
        answer = tok.decode(batch["targets"][i][batch["loss_mask"][i]]).strip()
        docs = [tok.decode(d[m]) for d, m in zip(batch["doc_tokens"][i], batch["doc_mask"][i])]
        return answer, docs

    changed = 0
    for _ in range(3):
        a, b = next(plain), next(swapped)
        assert np.array_equal(a["query_tokens"], b["query_tokens"])  # the same examples
        for i in range(b["tokens"].shape[0]):
            old, old_docs = answer_and_docs(a, i)
            new, docs = answer_and_docs(b, i)
            if new == old:
                continue
            changed += 1
            # The tiny config truncates documents: where the old answer was visible, the new
            # one is, in its place.
            if any(old in d for d in old_docs):
                assert any(new in d for d in docs) and not any(old in d for d in docs), \
                    (old, new, docs)
    assert changed > 0
    again = next(_loader(c, 2, out, augment=answer_swaps(1.0)))
    first = next(_loader(c, 2, out, augment=answer_swaps(1.0)))
    assert all(np.array_equal(again[k], first[k]) for k in first)  # seeded, so resumable
    held = next(_loader(c, 2, out, split="heldout", augment=answer_swaps(1.0)))
    assert all(np.array_equal(held[k], v)
               for k, v in next(_loader(tiny_config, 2, out, split="heldout")).items())
