"""data.stage_doc_chunks: stage documents longer than data.doc_max_len stored as the index's
chunks (the one holding the row's answer) instead of whole, then cut in the pipeline. Real
world files, the world's SentencePiece tokenizer, real TFDS builds read back with
`pipeline.read_rows`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clara_jax.config import ConfigError, finalize
from clara_jax.data import featurize, formats, pipeline, prompts, tfds_build


@pytest.fixture(scope="module")
def world_files(tmp_path_factory, tiny_config):
    from clara_jax.data import world
    from clara_jax.data.prepare import world_tokenizer

    out = tmp_path_factory.mktemp("sc_world")
    world.write_world(out, seed=0, size="small")
    return out / "train", world_tokenizer(tiny_config)


def _config(base, mode: str):
    c = base.copy_and_resolve_references()
    c.data.stage_doc_chunks = mode
    return finalize(c)


def _chunks(tok, config, doc: str) -> list[str]:
    room = config.data.doc_max_len - prompts.DOC_FRAME
    return [t for _, t in formats.document_chunks(doc, tok.encode(doc), tok, room,
                                                  config.data.chunk_overlap)]


def _corpus_chunks(out, config, tok, corpus_file) -> dict[str, list[str]]:
    """{original text: chunk texts} from a real corpus build in `out`, read back by id."""
    tfds_build.build_dataset("corpus", {"train": corpus_file}, out, config, tok, progress=False)
    by_id: dict[str, list[str]] = {}
    for r in pipeline.read_rows("corpus", out, "train"):
        by_id.setdefault(r.id.rpartition("#")[0] or r.id, []).append(r.text)
    texts = {r.id: r.text for _, r in formats.read_jsonl(corpus_file, "corpus")[0]}
    return {texts[i]: chunks for i, chunks in by_id.items()}


def _has(text: str, answer: str) -> bool:
    return answer.casefold() in text.casefold()


@pytest.fixture(scope="module")
def stage2_builds(world_files, tiny_config, tmp_path_factory):
    """Stage-2 world rows (the second's answer, Granoukic, is only in a late chunk of its gold
    document) plus one row whose answer is in no chunk; built with both modes, and the corpus
    built into the "answer" directory."""
    train, tok = world_files
    rows = [json.loads(line) for line in open(train / "stage2.jsonl")][:12]
    missing = dict(rows[1], answer="Zyzzogeton", gold_answer="Zyzzogeton")
    rows.append(missing)
    path = tmp_path_factory.mktemp("sc_in") / "stage2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    builds = {}
    for mode in ("truncate", "answer"):
        out = tmp_path_factory.mktemp(f"sc_{mode}")
        config = _config(tiny_config, mode)
        builds[mode] = (out, tfds_build.build_dataset("stage2", {"train": path}, out, config,
                                                      tok, progress=False))
    corpus = _corpus_chunks(builds["answer"][0], _config(tiny_config, "answer"), tok,
                            train / "corpus.jsonl")
    return rows, path, tok, builds, corpus


def test_answer_mode_stores_the_index_chunk_that_holds_the_answer(stage2_builds, tiny_config):
    rows, _, tok, builds, corpus = stage2_builds
    out, summary = builds["answer"]
    stored = pipeline.read_rows("stage2", out, "train")
    assert len(stored) == len(rows) and summary["stage_doc_chunks"] == "answer"
    row, got = rows[1], stored[1]
    gold = row["pos_index"][0]
    assert row["answer"] == "Granoukic"
    chunks = corpus[row["docs"][gold]]  # the corpus build's chunks of the same document
    assert len(chunks) > 2 and not _has(chunks[0], "Granoukic")
    first = next(k for k, c in enumerate(chunks) if _has(c, "Granoukic"))
    assert first > 0 and got.docs[gold] == chunks[first]
    # The other documents take their first chunk: the tokens truncation keeps, as text.
    for i, doc in enumerate(row["docs"]):
        if i != gold:
            assert got.docs[i] == corpus[doc][0]
    # Question, answers and pos_index are the row's.
    assert (got.question, got.answer, got.pos_index) == (row["question"], "Granoukic", (gold,))
    # The pipeline encodes the chunk whole (it fits doc_max_len): the gold latents' tokens.
    feat = featurize.Featurizer.from_config(tok, _config(tiny_config, "answer"), 2)
    ex = feat(tfds_build.data_source("stage2", out, "train")[1])
    keep, pos = featurize.select_docs(len(row["docs"]), row["pos_index"],
                                      tiny_config.data.num_docs)
    want = prompts.encode_document(tok, chunks[first], tiny_config.data.doc_max_len)[0]
    assert np.array_equal(ex["doc_tokens"][pos], want)


def test_answer_mode_counts_and_falls_back_to_the_first_chunk(stage2_builds, tiny_config):
    rows, path, tok, builds, corpus = stage2_builds
    out, summary = builds["answer"]
    stored = pipeline.read_rows("stage2", out, "train")
    gold = rows[-1]["pos_index"][0]
    assert stored[-1].docs[gold] == corpus[rows[-1]["docs"][gold]][0]  # Zyzzogeton: nowhere
    s = summary["splits"]["train"]
    parsed = [r for _, r in formats.read_jsonl(path, "stage2")[0]]
    long_docs = [(r, i) for r in parsed for i, d in enumerate(r.docs)
                 if len(_chunks(tok, tiny_config, d)) > 1]
    golds = [(r, i) for r, i in long_docs if i in r.pos_index]
    found = [(r, i) for r, i in golds
             if any(_has(c, a) for a in r.answers for c in _chunks(tok, tiny_config, r.docs[i]))]
    assert s["docs_chunked"] == len(long_docs) > len(golds)
    assert s["docs_chunk_by_answer"] == len(found) and s["docs_answer_not_found"] >= 1
    assert s["docs_chunk_by_answer"] + s["docs_answer_not_found"] == len(golds)
    assert s["docs_answer_past_first_chunk"] >= 1 and s["paraphrase_docs_truncated"] == 0
    [line] = [w for w in tfds_build.truncation_warnings(summary) if "documents" in w]
    assert "data.stage_doc_chunks=answer" in line
    assert f"{s['docs_chunk_by_answer']} took the chunk holding it" in line
    assert f"{s['docs_answer_not_found']} did not find it and took the first chunk" in line


def test_truncate_mode_keeps_whole_documents_and_names_the_option(stage2_builds):
    rows, _, _, builds, _ = stage2_builds
    out, summary = builds["truncate"]
    stored = pipeline.read_rows("stage2", out, "train")
    assert [list(r.docs) for r in stored] == [r["docs"] for r in rows]  # cut in the pipeline
    s = summary["splits"]["train"]
    assert summary["stage_doc_chunks"] == "truncate" and "docs_chunked" not in s
    [line] = [w for w in tfds_build.truncation_warnings(summary) if "documents" in w]
    assert "cut to data.doc_max_len tokens" in line
    assert "--config.data.stage_doc_chunks=answer" in line
    assert "--config.data.doc_max_len" in line


def test_stage1_qa_pairs_pick_their_own_chunk_and_paraphrases_stay_whole(
        world_files, tiny_config, tmp_path):
    train, tok = world_files
    config = _config(tiny_config, "answer")
    rows = [json.loads(line) for line in open(train / "stage1.jsonl")]
    qa = next(r for r in rows if r["data_type"] == "qa" and len(r["answers"]) > 2)
    para = [r for r in rows if r["data_type"] == "paraphrase"][:3]
    path = tmp_path / "stage1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [qa, *para]))
    summary = tfds_build.build_dataset("stage1", {"train": path}, tmp_path / "out", config, tok,
                                       progress=False)
    stored = pipeline.read_rows("stage1", tmp_path / "out", "train")
    chunks = _chunks(tok, config, qa["docs"][0])
    picked = set()
    for ex, answer in zip(stored, qa["answers"]):
        assert ex.data_type == "qa" and ex.answer == answer
        found = [c for c in chunks if _has(c, answer)]
        assert ex.doc == (found[0] if found else chunks[0])
        picked.add(ex.doc)
    assert len(picked) > 1  # the pairs' answers lie in different chunks of one document
    for ex, r in zip(stored[len(qa["answers"]):], para):
        assert ex.data_type == "paraphrase" and ex.doc == r["docs"][0]  # kept whole
    s = summary["splits"]["train"]
    assert s["paraphrase_docs_truncated"] == len(para)
    assert s["docs_chunked"] == len(qa["answers"])
    assert s["docs_chunk_by_answer"] + s["docs_answer_not_found"] == len(qa["answers"])
    [line] = [w for w in tfds_build.truncation_warnings(summary) if "documents" in w]
    assert f"{len(para)} paraphrase documents are cut to data.doc_max_len tokens" in line


def test_invalid_mode_is_a_one_line_config_error(tiny_config):
    c = tiny_config.copy_and_resolve_references()
    c.data.stage_doc_chunks = "chunk"
    with pytest.raises(ConfigError) as err:
        finalize(c)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("config.data.stage_doc_chunks='chunk'")
    assert "'truncate'" in msg and "'answer'" in msg
