"""The index over real latents: the bundled knowledge world's corpus, tokenized by the
project tokenizer and compressed by the tiny model (random weights still give latents of real
text), built resumably, searched with ScaNN against exact; the encoder on an 8-device mesh."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from clara_jax.index import (
    IndexMismatchError,
    LatentEncoder,
    LatentIndex,
    build_index,
    model_identity,
)
from clara_jax.index.corpus import chunk_windows, corpus_records, make_tokenize, read_corpus
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world_data(tiny_config, tmp_path_factory):
    """(tokenizer, train corpus file, chunk records of both splits' corpora, questions) of the
    bundled small world."""
    from clara_jax.data import world
    from clara_jax.data.prepare import world_tokenizer

    out = tmp_path_factory.mktemp("world")
    world.write_world(out, seed=0, size="small")
    tok = world_tokenizer(tiny_config)
    corpus = out / "train" / "corpus.jsonl"
    records = [r for split in world.SPLITS
               for r in read_corpus(out / split / "corpus.jsonl", tok,
                                    tiny_config.data.doc_max_len, tiny_config.data.chunk_overlap)]
    questions = [q.question for w in world.make_worlds(0, "small").values()
                 for q in w.questions][:600]
    return tok, corpus, records, questions


@pytest.fixture(scope="module")
def corpus_index(world_data, tiny_config, tiny_cfg, tiny_params, tmp_path_factory):
    tok, _, records, _ = world_data
    path = tmp_path_factory.mktemp("cidx") / "index"
    return build_index(path, tiny_cfg, tiny_params, records,
                       make_tokenize(tok, tiny_config.data.doc_max_len), chunk_size=512,
                       batch_size=32)


@pytest.fixture(scope="module")
def query_latents(world_data, tiny_config, tiny_cfg, tiny_params):
    tok, _, _, questions = world_data
    tokens, mask = make_tokenize(tok, tiny_config.data.doc_max_len)(
        [{"text": q} for q in questions])
    return LatentEncoder(tiny_cfg, tiny_params, 64, query=True)(tokens, mask)


def test_corpus_chunks_and_records(world_data, tiny_config, corpus_index):
    tok, _, records, _ = world_data
    room = tiny_config.data.doc_max_len - 3
    assert any("#" in r["id"] for r in records)  # long documents were split
    assert all(len(r["token_ids"]) <= room for r in records)
    assert corpus_index.num_docs == len(records) > 1000
    r = records[5]
    assert corpus_index.doc(r["id"]) == {"id": r["id"], "title": r["title"], "text": r["text"]}
    assert chunk_windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert corpus_index.meta["identity"]["num_memory_tokens"] == tiny_config.model.num_memory_tokens


def test_latents_match_direct_compress(world_data, tiny_config, tiny_cfg, tiny_params,
                                       corpus_index):
    from clara_jax.model import compress

    tok, _, records, _ = world_data
    pick = records[100:104]
    tokens, mask = make_tokenize(tok, tiny_config.data.doc_max_len)(pick)
    direct = np.asarray(jax.jit(lambda p, t, m: compress(tiny_cfg, p, t, m))(
        tiny_params, tokens, mask))
    stored = corpus_index.latents([r["id"] for r in pick])
    np.testing.assert_allclose(stored, direct, rtol=1e-5, atol=1e-5)


def test_scann_recall_on_real_latents(corpus_index, query_latents):
    """Default ScaNN parameters (partitioned: the corpus has > 2000 chunks) against exact."""
    assert corpus_index.scann.params.num_leaves > 0
    exact = corpus_index.search(query_latents, 10, backend="exact").rows
    approx = corpus_index.search(query_latents, 10, backend="scann").rows
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
    assert recall >= 0.95, recall


def test_int8_real_latents_recall_at_5(world_data, tiny_config, tiny_cfg, tiny_params,
                                       corpus_index, query_latents, tmp_path):
    tok, _, records, _ = world_data
    i8 = build_index(tmp_path / "i8", tiny_cfg, tiny_params, records,
                     make_tokenize(tok, tiny_config.data.doc_max_len), dtype="int8",
                     chunk_size=4096, batch_size=32, scann=False)
    truth = corpus_index.search(query_latents, 5, backend="exact").rows
    got = i8.search(query_latents, 5, backend="exact").rows
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, truth)])
    assert recall >= 0.99, recall  # against float32's top 5: at most 1 point lost


def test_build_resumes_after_interruption(world_data, tiny_config, tiny_cfg, tiny_params,
                                          corpus_index, tmp_path):
    tok, _, records, _ = world_data
    records = records[:700]
    base = make_tokenize(tok, tiny_config.data.doc_max_len)
    calls = {"n": 0}

    def interrupted(batch):
        calls["n"] += 1
        if calls["n"] > 16:  # 7 batches of <= 32 per chunk of 200: dies in chunk 3
            raise KeyboardInterrupt
        return base(batch)

    path = tmp_path / "resume"
    kw = dict(chunk_size=200, batch_size=32, scann=False)
    with pytest.raises(KeyboardInterrupt):
        build_index(path, tiny_cfg, tiny_params, records, interrupted, **kw)
    assert not (path / "meta.json").exists()
    with pytest.raises(Exception, match="unfinished build"):
        LatentIndex.open(path)
    # A different model may not resume it.
    other = jax.tree.map(lambda x: x * 1.5, tiny_params)
    with pytest.raises(IndexMismatchError, match="identity"):
        build_index(path, tiny_cfg, other, records, base, **kw)
    # Nor may a changed corpus.
    with pytest.raises(IndexMismatchError, match="corpus changed"):
        build_index(path, tiny_cfg, tiny_params, records[1:], base, **kw)
    idx = build_index(path, tiny_cfg, tiny_params, records, base, **kw)
    assert idx.meta["extra"]["resumed_chunks"] == 2
    ids = [r["id"] for r in records]
    np.testing.assert_allclose(idx.latents(ids), corpus_index.latents(ids), atol=1e-5)
    assert idx.identity == model_identity(tiny_cfg, tiny_params)
    with pytest.raises(IndexMismatchError):
        LatentIndex.open(path, identity=model_identity(tiny_cfg, other))


def test_encoder_sharded_over_8_devices(world_data, tiny_config, corpus_index):
    """The batch axis sharded over a (data=4, fsdp=2) mesh of 8 CPU devices gives the latents
    of one device (run in a subprocess: the device count is fixed when JAX starts)."""
    tok, _, records, _ = world_data
    pick = records[:20]  # not a multiple of the batch: padding is exercised
    tokens, mask = make_tokenize(tok, tiny_config.data.doc_max_len)(pick)
    want = corpus_index.latents([r["id"] for r in pick])
    script = textwrap.dedent("""
        import sys, numpy as np, jax
        sys.path.insert(0, sys.argv[1])
        from configs import tiny
        from clara_jax.model import ModelConfig, init_params
        from clara_jax.model.sharding import make_mesh
        from clara_jax.index import LatentEncoder
        assert jax.device_count() == 8
        cfg = ModelConfig.from_config(tiny.get_config())
        params = init_params(cfg, jax.random.key(0))
        d = np.load(sys.argv[2])
        enc = LatentEncoder(cfg, params, 12, mesh=make_mesh(data=4, fsdp=2))
        assert enc.batch_size == 16
        np.save(sys.argv[3], enc(d["tokens"], d["mask"]))
    """)
    tmp = os.path.join(os.path.dirname(corpus_index.path), "mesh")
    os.makedirs(tmp, exist_ok=True)
    inp, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npy")
    np.savez(inp, tokens=tokens, mask=mask)
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script, REPO, inp, out], check=True, env=env,
                   timeout=300)
    np.testing.assert_allclose(np.load(out), want, rtol=1e-4, atol=1e-4)


def test_corpus_records_from_rows(world_data, tiny_config):
    from clara_jax.data.formats import CorpusRow

    tok = world_data[0]
    long = CorpusRow("x", "T", " ".join(["word"] * 200))
    recs = list(corpus_records([long, CorpusRow("y", "", "short")], tok,
                               tiny_config.data.doc_max_len, tiny_config.data.chunk_overlap))
    assert [r["id"] for r in recs][:2] == ["x#0", "x#1"] and recs[-1]["id"] == "y"
    assert recs[-1]["text"] == "short"
