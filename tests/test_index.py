"""Latent index: store round trips, int8 bound, exact/ScaNN search, move, shards, add/delete,
and the safety errors (mismatched model, missing / truncated / corrupted files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from clara_jax.index import (
    INT8_REL_ERROR_BOUND,
    ExactSearcher,
    IndexBuilder,
    IndexFileError,
    IndexMismatchError,
    LatentIndex,
    ScannParams,
    ShardedIndex,
    config_hash,
    dequantize_int8,
    merge_topk,
    model_identity,
    open_index,
    params_checksum,
    quantize_int8,
    retrieval_keys,
    shard_dir_name,
)

M, L = 4, 32


def identity(tag: str = "a") -> dict:
    return {"version": 1, "config_hash": f"cfg-{tag}", "params_checksum": f"params-{tag}",
            "num_memory_tokens": M, "latent_width": L}


def clustered(n: int, seed: int, clusters: int = 20) -> np.ndarray:
    """float32[n, M, L]: random topic centres plus in-topic variation (not uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((clusters, M * L))
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, M * L))
    return x.reshape(n, M, L).astype(np.float32)


def build(path: Path, latents: np.ndarray, ids=None, dtype="float32", chunk_size=300,
          scann=True, tag="a", key="flat", texts=True) -> LatentIndex:
    n = len(latents)
    ids = ids if ids is not None else [f"doc{i}" for i in range(n)]
    b = IndexBuilder(path, identity(tag), dtype=dtype, key=key, chunk_size=chunk_size)
    k = 0
    for k, lo in enumerate(range(0, n, chunk_size)):
        sl = slice(lo, lo + chunk_size)
        b.write_chunk(k, latents[sl], ids[sl],
                      texts=[f"text of {i}" for i in ids[sl]] if texts else None)
    return b.finalize(k + 1, scann=scann)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |top-k(a) ∩ top-k(b)| / k over queries; rows int64[Q, k]."""
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


@pytest.fixture(scope="module")
def data():
    return clustered(1000, seed=0), clustered(50, seed=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory, data):
    """One float32 index with a partitioned ScaNN searcher (shared read-only by tests)."""
    docs, _ = data
    path = tmp_path_factory.mktemp("idx") / "base"
    params = ScannParams(num_leaves=20, leaves_to_search=6, reorder=150)
    return build(path, docs, scann=params)


# ----------------------------------------------------------------------------- store

@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("bfloat16", 2 ** -8)])
def test_store_round_trip(tmp_path, dtype, tol):
    docs = clustered(250, seed=3)
    idx = build(tmp_path / dtype, docs, dtype=dtype, chunk_size=100, scann=False)
    assert idx.meta["latent_shape"] == [250, M, L] and len(idx.store.chunks) == 3
    got = idx.store.read_rows(np.arange(250)[::-1])[::-1]
    np.testing.assert_allclose(got, docs, rtol=tol, atol=tol * np.abs(docs).max())
    np.testing.assert_array_equal(idx.latents(["doc7"])[0], got[7])
    assert idx.doc("doc123") == {"id": "doc123", "text": "text of doc123"}
    # Arrays are memory-mapped: reading rows does not load whole chunks.
    from clara_jax.index.store import load_npy
    assert isinstance(load_npy(idx.store.store_dir / "chunk-00000.latents.npy"), np.memmap)


def test_int8_round_trip_within_stated_bound():
    x = np.random.default_rng(0).standard_normal((64, M, L)).astype(np.float32) * 3.0
    x[0, 0] = 0.0  # an all-zero vector must survive
    q, scales = quantize_int8(x)
    assert q.dtype == np.int8 and scales.shape == (64, M)
    err = np.abs(dequantize_int8(q, scales) - x)
    bound = INT8_REL_ERROR_BOUND * np.abs(x).max(-1, keepdims=True) * (1 + 1e-6)
    assert np.all(err <= bound + 1e-7)
    assert err.max() > 0.25 * bound.max()  # the bound is tight, not vacuous
    np.testing.assert_array_equal(dequantize_int8(q, scales)[0, 0], 0.0)


def test_int8_keys_lose_at_most_one_point_of_recall(tmp_path, data):
    """Queries are noisy copies of known documents; recall@5 = the source document is in the
    top 5. int8 keys may cost at most 0.01 of it, and agree with float32's top 5 almost
    everywhere (the rest are near-ties)."""
    docs, _ = data
    rng = np.random.default_rng(7)
    src = rng.choice(len(docs), 300, replace=False)
    queries = docs[src] + 2.5 * rng.standard_normal((300, M, L)).astype(np.float32)
    f32 = build(tmp_path / "f32", docs, scann=False)
    i8 = build(tmp_path / "i8", docs, dtype="int8", scann=False)
    top_f32 = f32.search(queries, 5, backend="exact").rows
    top_i8 = i8.search(queries, 5, backend="exact").rows
    recall = lambda top: float(np.mean([s in row for s, row in zip(src, top)]))
    assert 0.3 < recall(top_f32) < 1.0  # the task is neither trivial nor hopeless
    assert recall(top_i8) >= recall(top_f32) - 0.01, (recall(top_i8), recall(top_f32))
    assert overlap(top_i8, top_f32) >= 0.95
    assert i8.store.store_dir.joinpath("chunk-00000.latents.npy").stat().st_size < \
        f32.store.store_dir.joinpath("chunk-00000.latents.npy").stat().st_size / 3


# ----------------------------------------------------------------------------- search

def test_exact_search_matches_numpy(built, data):
    docs, queries = data
    keys = retrieval_keys(docs)
    scores = retrieval_keys(queries) @ keys.T
    want = np.argsort(-scores, axis=1)[:, :10]
    res = built.search(queries, 10, backend="exact")
    np.testing.assert_array_equal(res.rows, want)
    np.testing.assert_allclose(res.scores, np.take_along_axis(scores, want, 1), atol=1e-5)
    assert res.ids[0][0] == f"doc{want[0, 0]}"
    # One query [M, L] gives one row of results.
    one = built.search(queries[3], 10, backend="exact")
    np.testing.assert_array_equal(one.rows[0], want[3])


def test_exact_searcher_blocks_and_short_results():
    keys = retrieval_keys(clustered(3000, seed=5))
    q = keys[:7]
    full = ExactSearcher(keys).search(q, 5)
    blocked = ExactSearcher(keys, block_rows=1024).search(q, 5)  # 3 blocks, merged
    np.testing.assert_array_equal(full[0], blocked[0])
    valid = np.zeros(3000, bool)
    valid[[3, 10]] = True
    rows, scores = ExactSearcher(keys, valid).search(q, 4)
    assert set(rows[0, :2]) == {3, 10} and np.all(rows[:, 2:] == -1)
    assert np.all(np.isneginf(scores[:, 2:]))


def test_mean_keys(tmp_path, data):
    docs, queries = data
    idx = build(tmp_path / "mean", docs, key="mean",
                scann=ScannParams(num_leaves=10, leaves_to_search=10, reorder=100))
    assert idx.scann.dim == L
    k = retrieval_keys(docs, "mean")
    want = np.argsort(-(retrieval_keys(queries, "mean") @ k.T), 1)[:, :10]
    np.testing.assert_array_equal(idx.search(queries, 10, backend="exact").rows, want)
    assert overlap(idx.search(queries, 10, backend="scann").rows, want) >= 0.95


def test_scann_recall_and_batch_vs_single(built, data):
    _, queries = data
    exact = built.search(queries, 10, backend="exact").rows
    res = built.search(queries, 10, backend="scann")
    assert overlap(res.rows, exact) >= 0.95
    for i in (0, 17):
        np.testing.assert_array_equal(built.search(queries[i], 10, backend="scann").rows[0],
                                      res.rows[i])


def test_move_directory_identical_results_and_no_pickle(built, data, tmp_path):
    _, queries = data
    before = built.search(queries, 10, backend="scann")
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(built.path, moved)
    assert not list(moved.rglob("*.pkl"))
    assets = (moved / built.meta["scann"]["dir"] / "scann_assets.pbtxt").read_text()
    assert str(built.path) not in assets and 'asset_path: "/' not in assets
    after = LatentIndex.open(moved).search(queries, 10, backend="scann")
    np.testing.assert_array_equal(after.rows, before.rows)
    np.testing.assert_array_equal(after.scores, before.scores)
    assert after.ids == before.ids


def test_sharded_equals_unsharded(tmp_path, data):
    docs, queries = data
    ids = [f"doc{i}" for i in range(len(docs))]
    whole = build(tmp_path / "whole", docs, scann=False)
    n = 3
    for s in range(n):  # doc i goes to shard i % n, each built on its own
        build(tmp_path / "sharded" / shard_dir_name(s, n), docs[s::n], ids[s::n],
              scann=ScannParams(num_leaves=0, leaves_to_search=0, reorder=400), chunk_size=128)
    sharded = open_index(tmp_path / "sharded")
    assert isinstance(sharded, ShardedIndex) and sharded.num_docs == len(docs)
    want = whole.search(queries, 10, backend="exact")
    got = sharded.search(queries, 10, backend="exact")
    assert got.ids == want.ids
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
    # ScaNN with exact re-scoring of every point: the same top-k through the merge.
    assert sharded.search(queries, 10, backend="scann").ids == want.ids
    # Deleting by id reaches the shards that hold the documents.
    gone = [want.ids[0][0], want.ids[1][0], want.ids[2][1]]
    sharded.delete(gone)
    whole.delete(gone)
    reopened = open_index(tmp_path / "sharded")
    assert reopened.num_docs == len(docs) - 3
    for backend in ("exact", "scann"):
        assert reopened.search(queries, 10, backend=backend).ids == \
            whole.search(queries, 10, backend="exact").ids
    with pytest.raises(KeyError, match=r"is not in the index .*\(3 shards\)"):
        sharded.delete([gone[0]])
    shutil.rmtree(tmp_path / "sharded" / shard_dir_name(1, n))
    with pytest.raises(IndexFileError, match=shard_dir_name(1, n)):
        open_index(tmp_path / "sharded")


def test_merge_topk_orders_by_score():
    a = (np.array([[0, 1]]), np.array([[0.9, 0.1]], np.float32))
    b = (np.array([[5, -1]]), np.array([[0.5, -np.inf]], np.float32))
    shard, rows, scores = merge_topk([a, b], 3)
    assert shard.tolist() == [[0, 1, 0]] and rows.tolist() == [[0, 5, 1]]
    shard, rows, _ = merge_topk([a, b], 5)
    assert rows.tolist() == [[0, 5, 1, -1, -1]] and shard[0, -1] == -1


def test_add_and_delete_without_rebuild(tmp_path, data):
    docs, queries = data
    idx = build(tmp_path / "upd", docs, scann=ScannParams(num_leaves=20, leaves_to_search=20,
                                                          reorder=200))
    partitioner = (idx.path / "scann-0" / "serialized_partitioner.pb").read_bytes()
    idx.delete(["doc5", "doc999"])
    new = queries[:3] * 1.0
    idx.add(new, ["new0", "new1", "new2"], texts=["a", "b", "c"])
    assert idx.num_docs == len(docs) + 1 and idx.meta["generation"] == 2
    reopened = LatentIndex.open(idx.path)
    # No retraining: ScaNN keeps its partitioner; the old generation's files are gone.
    assert (idx.path / "scann-2" / "serialized_partitioner.pb").read_bytes() == partitioner
    assert not (idx.path / "scann-0").exists() and not (idx.path / "scann-1").exists()
    for backend in ("exact", "scann"):
        res = reopened.search(queries[:3], 5, backend=backend)
        assert [r[0] for r in res.ids] == ["new0", "new1", "new2"], backend
        target = reopened.search(docs[5], 5, backend=backend).ids[0]
        assert "doc5" not in target and "doc999" not in sum(res.ids, []), backend
    # Equal to a fresh exact index over the same documents.
    keep = [i for i in range(len(docs)) if i not in (5, 999)]
    fresh = build(tmp_path / "fresh", np.concatenate([docs[keep], new]),
                  [f"doc{i}" for i in keep] + ["new0", "new1", "new2"], scann=False)
    assert reopened.search(queries, 10, backend="exact").ids == \
        fresh.search(queries, 10, backend="exact").ids
    assert reopened.doc("new1")["text"] == "b"
    with pytest.raises(KeyError, match="doc5"):
        reopened.doc("doc5")
    with pytest.raises(ValueError, match="already exists"):
        reopened.add(new[:1], ["doc1"])


def test_a_chunked_documents_plain_id_names_its_chunks(tmp_path, data):
    docs, _ = data
    ids = ["a#0", "a#1", "a#2", "b", "c#0", "c#1", "ab#0"] + [f"doc{i}" for i in range(7, 40)]
    idx = build(tmp_path / "chunked", docs[:40], ids, scann=False)
    assert idx.resolve(["b", "a", "c#1"]) == ["b", "a#0", "a#1", "a#2", "c#1"]
    with pytest.raises(KeyError, match=r"'x' is not in the index .*nor is any chunk x#k"):
        idx.resolve(["b", "x"])
    idx.delete(["a", "c#0"])
    reopened = LatentIndex.open(idx.path)
    assert reopened.num_docs == 40 - 4
    assert reopened.resolve(["c", "ab"]) == ["c#1", "ab#0"]
    with pytest.raises(KeyError, match="'a'"):
        reopened.delete(["a"])  # its chunks are gone: nothing left to name


# ----------------------------------------------------------------------------- safety

def test_identity_helpers(tiny_cfg, tiny_params):
    import dataclasses

    ident = model_identity(tiny_cfg, tiny_params)
    assert ident["num_memory_tokens"] == tiny_cfg.num_memory_tokens
    assert config_hash(dataclasses.replace(tiny_cfg, remat="full")) == ident["config_hash"]
    assert config_hash(dataclasses.replace(tiny_cfg, n_layers=3)) != ident["config_hash"]
    # Adapters other than the compressor's do not change the identity; compressor weights do.
    gen = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1.0 if "lora_generator" in jax.tree_util.keystr(p) else x, tiny_params)
    assert params_checksum(gen) == ident["params_checksum"]
    comp = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1.0 if "lora_compressor" in jax.tree_util.keystr(p) else x,
        tiny_params)
    assert params_checksum(comp) != ident["params_checksum"]


def test_identity_same_for_scanned_layers(tiny_config):
    import dataclasses

    from clara_jax.model import ModelConfig, init_params

    cfg = ModelConfig.from_config(tiny_config)
    params = init_params(cfg, jax.random.key(1))
    scfg = dataclasses.replace(cfg, scan_layers=True)
    layers = [params["decoder"][f"layers_{i}"] for i in range(cfg.n_layers)]
    stacked = {k: v for k, v in params["decoder"].items() if not k.startswith("layers_")}
    stacked["layers"] = jax.tree.map(lambda *a: np.stack(a), *layers)
    sparams = dict(params, decoder=stacked)
    assert model_identity(scfg, sparams) == model_identity(cfg, params)


def test_mismatched_model_refused(built, data, tmp_path):
    other = identity("b")
    with pytest.raises(IndexMismatchError, match="config_hash.*params_checksum"):
        LatentIndex.open(built.path, identity=other)
    with pytest.raises(IndexMismatchError, match="different compressor"):
        built.check_identity(other)
    LatentIndex.open(built.path, identity=identity("a"))  # the right model opens it
    wrong_shape = dict(identity("a"), latent_width=L * 2)
    with pytest.raises(IndexMismatchError, match="latent_width"):
        LatentIndex.open(built.path, identity=wrong_shape)
    with pytest.raises(IndexMismatchError, match="query latents have shape"):
        built.search(np.zeros((2, M, L * 2), np.float32))
    b = build(tmp_path / "b", data[0][:100], [f"x{i}" for i in range(100)], tag="b",
              scann=False)
    with pytest.raises(IndexMismatchError, match="different compressor"):
        ShardedIndex([built, b])


def _copy(built, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(built.path, dst)
    return dst


def test_truncated_file_named(built, tmp_path):
    dst = _copy(built, tmp_path)
    victim = dst / "store" / "chunk-00001.latents.npy"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(IndexFileError, match=r"chunk-00001\.latents\.npy.*truncated"):
        LatentIndex.open(dst)


def test_corrupted_latents_named_on_read(built, data, tmp_path):
    dst = _copy(built, tmp_path)
    victim = dst / "store" / "chunk-00002.latents.npy"
    raw = bytearray(victim.read_bytes())
    raw[-10] ^= 0xFF  # same size, different bytes
    victim.write_bytes(bytes(raw))
    idx = LatentIndex.open(dst, load_scann=False)  # sizes are fine, so it opens
    idx.store.read_rows([0, 1])  # chunk 0 is intact
    with pytest.raises(IndexFileError, match=r"chunk-00002\.latents\.npy.*corrupted"):
        idx.search(data[1], 5, backend="exact")


@pytest.mark.parametrize("name", ["serialized_partitioner.pb", "rows.npy", "ah_codebook.pb"])
def test_corrupted_scann_file_named(built, tmp_path, name):
    dst = _copy(built, tmp_path)
    victim = dst / built.meta["scann"]["dir"] / name
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    victim.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match=name.replace(".", r"\.") + ".*corrupted"):
        LatentIndex.open(dst)


def test_missing_and_bad_metadata_named(built, tmp_path):
    dst = _copy(built, tmp_path)
    (dst / "store" / "chunk-00000.docs.jsonl").unlink()
    with pytest.raises(IndexFileError, match=r"chunk-00000\.docs\.jsonl: missing"):
        LatentIndex.open(dst)
    shutil.rmtree(dst)
    dst = _copy(built, tmp_path)
    meta = dst / "meta.json"
    meta.write_text(meta.read_text()[:-20])
    with pytest.raises(IndexFileError, match=r"meta\.json:\d+:\d+: corrupted"):
        LatentIndex.open(dst)
    obj = json.loads((built.path / "meta.json").read_text())
    del obj["identity"]["params_checksum"]
    meta.write_text(json.dumps(obj))
    with pytest.raises(IndexFileError, match="meta.json: field 'params_checksum' is missing"):
        LatentIndex.open(dst)
    (dst / "stray.pkl").write_bytes(b"x")  # unrelated top-level files are ignored ...
    sdir = dst / built.meta["scann"]["dir"]
    (sdir / "scann_docids.pkl").write_bytes(b"not loaded")  # ... a pickle in ScaNN's is not
    meta.write_text((built.path / "meta.json").read_text())
    with pytest.raises(IndexFileError, match=r"scann_docids\.pkl: unexpected file"):
        LatentIndex.open(dst)


def test_chunk_record_tampering_named(built, tmp_path):
    dst = _copy(built, tmp_path)
    rec = dst / "store" / "chunk-00001.json"
    obj = json.loads(rec.read_text())
    obj["ids"][0] = "evil"
    rec.write_text(json.dumps(obj))
    with pytest.raises(IndexFileError, match=r"chunk-00001\.json"):
        LatentIndex.open(dst)
