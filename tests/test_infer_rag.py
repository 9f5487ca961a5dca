"""The RAG answer pipeline (latent / text / closed-book), adaptive refinement, latent
inspection, and the `clara ask` / `clara inspect` commands, end to end on configs/tiny.py with
a real tokenizer and a real latent index."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from clara_jax.data import prompts, world
from clara_jax.data.tokenizer import SentencePieceTokenizer
from clara_jax.index import build_index, model_identity, open_index
from clara_jax.index.corpus import make_tokenize
from clara_jax.infer.generation import Generator
from clara_jax.infer.rag import RagPipeline, RagSettings
from tests import eval_support as es

NUM_DOCS = 10


@pytest.fixture(scope="module")
def world_data():
    w = world.make_world(0, "small", "train")
    docs = list(w.docs.items())[:NUM_DOCS]
    questions = [q.question for q in w.questions][:5]
    return docs, questions, w


@pytest.fixture(scope="module")
def tok(world_data, tiny_cfg):
    _, _, w = world_data
    texts = list(w.docs.values()) + [q.question for q in w.questions]
    return SentencePieceTokenizer.train(texts, 512, tiny_cfg.num_memory_tokens, seed=0,
                                        extra_texts=prompts.template_texts())


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, world_data, tok, tiny_config, tiny_cfg, tiny_params):
    docs, _, _ = world_data
    out = tmp_path_factory.mktemp("rag") / "idx"
    records = [{"id": i, "title": f"doc {i}", "text": t} for i, t in docs]
    build_index(out, tiny_cfg, tiny_params, records,
                make_tokenize(tok, tiny_config.data.doc_max_len), scann=True, batch_size=16)
    return out


@pytest.fixture(scope="module")
def pipeline(tiny_config, tiny_cfg, tiny_params, tok, index_dir):
    index = open_index(index_dir, identity=model_identity(tiny_cfg, tiny_params))
    settings = RagSettings(num_docs=2, max_new_tokens=6, batch_size=8, backend="exact")
    return RagPipeline(tiny_config, tiny_cfg, tiny_params, tok, index, settings)


def _direct(pipeline, toks, slots=None, latents=None, n=6):
    gen = Generator(pipeline.cfg, pipeline.params, eos_id=pipeline.tok.eos_id,
                    pad_id=pipeline.tok.pad_id, max_new_tokens=n)
    return gen(toks, slots=slots, latents=latents)


def test_three_modes_end_to_end(pipeline, world_data, tok, tiny_config):
    _, questions, _ = world_data
    index, k, m = pipeline.index, 2, pipeline.cfg.num_memory_tokens
    qlat = pipeline.query_latents(questions)
    expect = index.search(qlat, k, "exact")
    qmax = tiny_config.data.question_max_len
    results = {}
    for mode in ("latent", "text", "closed_book"):
        answers, stats = pipeline.answer(questions, mode=mode)
        assert stats == {"questions": len(questions), "refined": 0, "mode": mode}
        assert [a.question for a in answers] == questions
        assert all(isinstance(a.answer, str) and a.mode == mode for a in answers)
        results[mode] = answers
    for i, a in enumerate(results["latent"]):
        assert a.doc_ids == expect.ids[i] and len(a.doc_ids) == k
        np.testing.assert_allclose(a.scores, expect.scores[i], atol=1e-5)
        assert results["text"][i].doc_ids == a.doc_ids
        assert results["closed_book"][i].doc_ids == []
    # Latent mode == generating directly from the stored latents of the retrieved documents.
    built = [prompts.inference_prompt(tok, q, k, m, qmax) for q in questions]
    lat = np.stack([index.latents(a.doc_ids) for a in results["latent"]])
    direct = _direct(pipeline, [t.tolist() for t, _ in built], [s.tolist() for _, s in built],
                     lat)
    for i, a in enumerate(results["latent"]):
        assert a.tokens == direct.tokens[i, :direct.lengths[i]].tolist()
        assert a.answer == tok.decode(a.tokens).strip()
    # Text mode reads the documents' stored text: its prompt holds their tokens.
    room = tiny_config.data.doc_max_len - prompts.DOC_FRAME
    text_prompts = [prompts.text_rag_prompt(tok, q, [index.doc(d)["text"] for d in a.doc_ids],
                                            room, qmax) for q, a in zip(questions,
                                                                        results["text"])]
    first_doc = tok.encode(index.doc(results["text"][0].doc_ids[0])["text"])[:room]
    assert len(first_doc) > 5
    assert " ".join(map(str, first_doc)) in " ".join(map(str, text_prompts[0]))
    direct = _direct(pipeline, [p.tolist() for p in text_prompts])
    for i, a in enumerate(results["text"]):
        assert a.tokens == direct.tokens[i, :direct.lengths[i]].tolist()
    # ScaNN retrieval (exactly re-ranked on a corpus this small) finds the same documents.
    scann = RagPipeline(pipeline.config, pipeline.cfg, pipeline.params, tok, index,
                        dataclasses.replace(pipeline.settings, backend="scann"))
    assert ([a.doc_ids for a in scann.answer(questions)[0]]
            == [a.doc_ids for a in results["latent"]])
    # The modes are different computations on the same decoder.
    assert ([a.tokens for a in results["latent"]] != [a.tokens for a in results["closed_book"]])


def test_refinement_redoes_only_uncertain_rows(pipeline, world_data):
    _, questions, _ = world_data
    base, _ = pipeline.answer(questions)
    entropies = np.asarray([a.entropy for a in base])
    threshold = float(np.median(entropies))
    uncertain = entropies > threshold
    assert 0 < uncertain.sum() < len(questions)
    more = dataclasses.replace(pipeline.settings, num_docs=3)
    wide, _ = RagPipeline(pipeline.config, pipeline.cfg, pipeline.params, pipeline.tok,
                          pipeline.index, more).answer(questions)
    pipeline.settings = dataclasses.replace(pipeline.settings, refine_threshold=threshold,
                                            refine_docs=1)
    try:
        refined, stats = pipeline.answer(questions)
        assert stats["refined"] == int(uncertain.sum())
        for i, a in enumerate(refined):
            assert a.refined == bool(uncertain[i])
            want = wide[i] if uncertain[i] else base[i]
            assert a.doc_ids == want.doc_ids and a.tokens == want.tokens, i
        pipeline.settings = dataclasses.replace(pipeline.settings, refine_threshold=1e9)
        assert pipeline.answer(questions)[1]["refined"] == 0
        pipeline.settings = dataclasses.replace(pipeline.settings, refine_threshold=-1.0)
        assert pipeline.answer(questions, mode="text")[1]["refined"] == len(questions)
        assert pipeline.answer(questions, mode="closed_book")[1]["refined"] == 0
    finally:
        pipeline.settings = dataclasses.replace(pipeline.settings, refine_threshold=None)


def test_inspect_decodes_latents_and_lists_neighbours(pipeline, world_data, tok, tiny_config):
    docs, _, _ = world_data
    doc_id = docs[3][0]
    out = pipeline.inspect_document(doc_id, max_new_tokens=8, num_neighbors=4)
    assert out["id"] == doc_id and out["stored"]["text"] == docs[3][1]
    ids = [n["id"] for n in out["neighbors"]]
    assert len(ids) == 4 and doc_id not in ids
    scores = [n["score"] for n in out["neighbors"]]
    assert scores == sorted(scores, reverse=True)
    t, s = prompts.inference_prompt(tok, prompts.PARAPHRASE_QUESTION, 1,
                                    pipeline.cfg.num_memory_tokens,
                                    tiny_config.data.question_max_len)
    direct = _direct(pipeline, [t.tolist()], [s.tolist()],
                     pipeline.index.latents([doc_id])[None], n=8)
    assert out["decoded"] == tok.decode(direct.tokens[0, :direct.lengths[0]].tolist()).strip()
    with pytest.raises(KeyError, match="nope"):
        pipeline.inspect_document("nope")


def test_settings_and_retrieval_errors(pipeline, world_data):
    _, questions, _ = world_data
    with pytest.raises(ValueError, match="mode="):
        RagSettings(mode="open_book")
    with pytest.raises(ValueError, match="fewer than"):
        pipeline.retrieve(questions[:1], NUM_DOCS + 1)


def test_clara_ask_and_inspect_commands(tmp_path, tiny_config, tiny_params, tok, index_dir,
                                        world_data, pipeline):
    from clara_jax.train import checkpoint as ckpt
    from clara_jax.train.state import create_state

    docs, questions, _ = world_data
    config = tiny_config.copy_and_resolve_references()
    config.train.data_dir = str(tmp_path / "data")
    tok.save(tmp_path / "data" / "tokenizer")
    manager = ckpt.make_manager(tmp_path / "run", async_save=False)
    ckpt.save(manager, create_state(config, tiny_params, 2), None,
              {"stage": 2, "config": config.to_json()})
    manager.wait_until_finished()
    manager.close()
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": i, "question": q}) + "\n"
                             for i, q in enumerate(questions[:3])))
    out = tmp_path / "answers.jsonl"
    common = [f"--checkpoint={tmp_path / 'run'}", f"--index={index_dir}", "--backend=exact"]
    r = es.clara("ask", *common, f"--file={qfile}", f"--out={out}", "--show_docs",
                 "--num_docs=2", "--max_new_tokens=6", "--noprogress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expect, _ = pipeline.answer(questions[:3])
    assert [row["id"] for row in rows] == [0, 1, 2]
    for row, a in zip(rows, expect):
        assert row["answer"] == a.answer and row["doc_ids"] == a.doc_ids
        assert [d["id"] for d in row["docs"]] == a.doc_ids
        assert all(d["text"] for d in row["docs"])
    assert json.loads(r.stderr.strip().splitlines()[-1])["questions"] == 3

    r = es.clara("inspect", *common, f"--doc={docs[0][0]}", "--max_new_tokens=4",
                 "--neighbors=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["id"] == docs[0][0] and len(got["neighbors"]) == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok?"}\n{"q": 1}\n')
    r = es.clara("ask", *common, f"--file={bad}", cwd=tmp_path)
    assert r.returncode == 2 and f"{bad}:2: field 'question'" in r.stderr
