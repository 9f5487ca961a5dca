"""The bundled knowledge world: determinism, disjoint worlds, answerable questions, document
lengths, reference-format files and a closed-book frequency baseline near chance."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clara_jax.data import formats, prompts, world
from clara_jax.data.tokenizer import SentencePieceTokenizer


@pytest.fixture(scope="module")
def worlds():
    return world.make_worlds(0, "small")


def test_deterministic_for_a_seed(worlds):
    again = world.make_worlds(0, "small")
    for split in world.SPLITS:
        assert again[split].docs == worlds[split].docs
        assert again[split].questions == worlds[split].questions
    other = world.make_worlds(1, "small")["train"]
    assert other.docs != worlds["train"].docs


def test_train_and_heldout_are_disjoint_with_same_relation_types(worlds):
    train, heldout = worlds["train"], worlds["heldout"]
    assert not {e.name for e in train.entities} & {e.name for e in heldout.entities}
    assert {q.qtype for q in train.questions} == {q.qtype for q in heldout.questions}
    assert {e.kind for e in train.entities} == {"person", "organisation", "city", "country",
                                                "work"}
    assert {q.hops for q in train.questions} == {1, 2}


def test_every_answer_is_in_its_gold_documents(worlds):
    for w in worlds.values():
        by_id = {e.doc_id: e for e in w.entities}
        for q in w.questions:
            assert q.answer in w.docs[q.gold[-1]], q
            if q.hops == 2:
                bridge = by_id[q.gold[1]]
                assert bridge.name in w.docs[q.gold[0]], q  # the first hop names the bridge
                assert q.answer in w.paraphrases[q.gold[1]]
            else:
                assert q.answer in w.paraphrases[q.gold[0]]


def test_document_lengths_in_tokens(worlds):
    """Documents are 60-250 tokens with the tiny test vocabulary, and with the demo config's
    own world tokenizer (2048 pieces) they fit its document length."""
    from clara_jax.data.prepare import world_tokenizer
    from configs import demo

    texts = [t for w in worlds.values() for t in w.docs.values()]
    tiny = SentencePieceTokenizer.train(texts, 512, 4, extra_texts=prompts.template_texts())
    lens = np.array([len(ids) for ids in tiny.encode_batch(texts)])
    assert 60 <= lens.min() and lens.max() <= 250, (lens.min(), lens.max())
    config = demo.get_config()
    tok = world_tokenizer(config, seed=0, size="small")
    lens = np.array([len(ids) for ids in tok.encode_batch(texts)])
    assert 45 <= lens.min() and np.percentile(lens, 10) >= 55
    assert np.mean(lens > config.data.doc_max_len - prompts.DOC_FRAME) <= 0.01


def test_question_type_names_the_relation_of_every_question(worlds):
    for w in worlds.values():
        for q in w.questions:  # qtype is "kind.attr" or "kind.attr>attr"
            assert world.question_type(q.question) == q.qtype.split(".", 1)[1], q
    assert world.question_type("What is the capital of Vicheesh?") == "capital"
    assert world.question_type("Who is the mayor of the capital of Vicheesh?") == "capital>mayor"
    assert world.question_type("Why is the sky blue?") == "other"


def test_focused_documents_keep_the_subjects_facts_and_drop_the_others(worlds):
    w = worlds["train"]
    f = world.focused(w)
    for e in w.entities:
        doc = f.docs[e.doc_id]
        assert len(doc) < len(w.docs[e.doc_id]) or doc == w.docs[e.doc_id]
        for value in e.facts.values():  # relation values are names: the subject's all stay
            assert value in doc, (e.name, value)
        for sentence in doc.split(". "):
            assert e.name in sentence or world.short_name(e) in sentence, sentence
    assert sum(f.docs[e.doc_id] != w.docs[e.doc_id] for e in w.entities) > len(w.entities) // 2
    # The same entities and questions: only the documents change.
    assert f.questions == w.questions and f.entities == w.entities


def test_closed_book_frequency_baseline_is_near_chance(worlds):
    result = world.frequency_baseline(worlds["train"], worlds["heldout"])
    assert result["heldout_accuracy"] <= max(0.08, 2 * result["chance"]), result
    assert result["chance"] < 0.1


def test_written_files_are_reference_format(tmp_path):
    summary = world.write_world(tmp_path / "w", seed=3, size="small")
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["w"]  # no temporary left behind
    for split in world.SPLITS:
        counts = summary["splits"][split]["rows"]
        for name in world.FILES:
            fmt = name.removesuffix(".jsonl")
            rows, stats = formats.read_jsonl(tmp_path / "w" / split / name, fmt)
            assert stats.bad_rows == 0 and stats.rows == counts[name] > 0
        stage3 = [json.loads(x) for x in open(tmp_path / "w" / split / "stage3.jsonl")]
        assert set(stage3[0]) == {"question", "docs", "pos_index", "answer"}
        assert all(len(r["docs"]) == world.STAGE3_CANDIDATES for r in stage3)
        assert all(r["answer"] in " ".join(r["docs"][i] for i in r["pos_index"])
                   for r in stage3)
        assert {len(r["pos_index"]) for r in stage3} == {1, 2}
        stage2 = [json.loads(x) for x in open(tmp_path / "w" / split / "stage2.jsonl")]
        assert all(len(r["docs"]) == world.STAGE2_DOCS for r in stage2)
        assert set(stage2[0]) == {"question", "docs", "gold_answer", "answer", "pos_index"}
        stage1 = [json.loads(x) for x in open(tmp_path / "w" / split / "stage1.jsonl")]
        assert {r["data_type"] for r in stage1} == {"qa", "paraphrase"}
    # Writing again over the same directory replaces the files in place.
    again = world.write_world(tmp_path / "w", seed=3, size="small")
    assert again == summary


def test_train_and_heldout_worlds_can_differ_in_size():
    assert world.split_sizes("medium/small") == {"train": "medium", "heldout": "small"}
    assert world.split_sizes("small") == {"train": "small", "heldout": "small"}
    with pytest.raises(ValueError, match="world size"):
        world.split_sizes("large/small")
    worlds = world.make_worlds(0, "medium/small")
    assert len(worlds["train"].docs) > 5 * len(worlds["heldout"].docs)
    train_names = {e.name for e in worlds["train"].entities}
    assert not train_names & {e.name for e in worlds["heldout"].entities}
