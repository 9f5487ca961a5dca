"""A sharded index searched from several JAX processes (clara_jax/index/multihost.py): the
merge of ranked lists (ties, shards shorter than k, two levels equal to one), the shard
assignment, and two real processes (launch/local_multiprocess.sh, real ScaNN, real files),
each opening only its own shards, getting exactly the top-k that one process searching every
shard gets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from clara_jax.index import (
    ShardedIndex,
    assigned_shards,
    merge_ranked,
    merge_topk,
    open_index,
    shard_dir_name,
)
from tests.conftest import REPO
from tests.test_index import build, clustered

# ----------------------------------------------------------------------------- merge


def _ranked(scores, rows):
    return np.array([rows], np.int64), np.array([scores], np.float32)


def test_merge_ties_go_to_the_lower_shard_then_the_earlier_rank():
    a = _ranked([0.5, 0.5], [3, 4])          # shard 0
    b = _ranked([0.9, 0.5, 0.5], [7, 8, 9])  # shard 1
    shard, rows, scores = merge_topk([a, b], 5)
    assert shard.tolist() == [[1, 0, 0, 1, 1]] and rows.tolist() == [[7, 3, 4, 8, 9]]
    assert scores.tolist() == [[np.float32(0.9)] + [0.5] * 4]
    # The same candidates in another arrangement (shard 1's list first, as a host holding
    # it would send them): the order does not depend on where they come from.
    sh = np.array([[1, 1, 1, 0, 0]])
    got = merge_ranked(sh, np.array([[7, 8, 9, 3, 4]]),
                       np.array([[0.9, 0.5, 0.5, 0.5, 0.5]], np.float32), 5)
    for x, y in zip(got, (shard, rows, scores)):
        np.testing.assert_array_equal(x, y)


def test_merge_pads_when_the_shards_hold_fewer_than_k():
    a = _ranked([0.7, -np.inf], [2, -1])  # a shard of one document, searched with k=2
    b = _ranked([0.8], [5])
    shard, rows, scores = merge_topk([a, b], 4)
    assert shard.tolist() == [[1, 0, -1, -1]] and rows.tolist() == [[5, 2, -1, -1]]
    assert np.isneginf(scores[0, 2:]).all()
    shard, rows, scores = merge_ranked(np.zeros((2, 0)), np.zeros((2, 0)), np.zeros((2, 0)), 3)
    assert shard.shape == (2, 3) and (rows == -1).all() and np.isneginf(scores).all()


def test_two_level_merge_equals_one_merge():
    """Hosts merge their shards, then the hosts' lists are merged: the same top-k, ties
    included, as one merge of every shard (scores on a coarse grid, so ties are common)."""
    rng = np.random.default_rng(0)
    q, k, num_shards, hosts = 40, 6, 5, 2
    parts = []
    for _ in range(num_shards):
        n = int(rng.integers(0, k + 1))  # some shards hold fewer than k (or no) documents
        s = np.full((q, k), -np.inf, np.float32)
        s[:, :n] = -np.sort(-rng.integers(0, 4, (q, n)) / 4, axis=1)
        r = np.where(np.isfinite(s), rng.integers(0, 100, (q, k)), -1)
        parts.append((r, s))
    want = merge_topk(parts, k)
    lists = []
    for h in range(hosts):
        mine = assigned_shards(num_shards, h, hosts)
        pos, r, s = merge_topk([parts[i] for i in mine], k)
        lists.append((np.where(pos >= 0, np.asarray(mine)[pos.clip(0)], -1), r, s))
    got = merge_ranked(*(np.concatenate([x[j] for x in lists], axis=1) for j in range(3)), k)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)


def test_shard_assignment():
    assert [assigned_shards(3, p, 2) for p in range(2)] == [[0, 2], [1]]
    assert [assigned_shards(1, p, 3) for p in range(3)] == [[0], [], []]  # fewer shards
    for n, procs in ((4, 4), (7, 3), (2, 5)):
        got = sorted(i for p in range(procs) for i in assigned_shards(n, p, procs))
        assert got == list(range(n))  # every shard on exactly one process


# ----------------------------------------------------------------------------- processes

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """ROOT/whole: 60 documents in 3 shards (document i in shard i % 3, each with its own
    ScaNN searcher); ROOT/host0 and ROOT/host1: only the shards process 0 (0, 2) and process
    1 (1) open, as two hosts' disks would hold them; ROOT/one0: a 1-shard index (process 1
    has none); ROOT/queries.npy. Documents 1 and 2 are identical and lie in shards 1 and 2,
    which are on different processes, and query 0 is document 1: its top two results tie,
    and process 0 (shard 2) sends its list first."""
    root = tmp_path_factory.mktemp("multihost")
    docs = clustered(60, seed=5)
    docs[2] = docs[1]
    ids = [f"doc{i}" for i in range(60)]
    for s in range(3):
        build(root / "whole" / shard_dir_name(s, 3), docs[s::3], ids[s::3], chunk_size=8)
    for p, mine in ((0, (0, 2)), (1, (1,))):
        for s in mine:
            shutil.copytree(root / "whole" / shard_dir_name(s, 3),
                            root / f"host{p}" / shard_dir_name(s, 3))
    build(root / "one0" / shard_dir_name(0, 1), docs[:30], ids[:30])
    queries = clustered(7, seed=6)
    queries[0] = docs[1]
    np.save(root / "queries.npy", queries)
    return root


def test_two_processes_search_their_own_shards_and_merge_to_the_one_process_top_k(
        shards, tmp_path):
    root = shards
    run = subprocess.run(
        [str(REPO / "launch" / "local_multiprocess.sh"), "2", "--logdir", str(tmp_path / "logs"),
         "--", sys.executable, str(REPO / "tests" / "multiprocess_index.py"), str(root),
         str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    facts = [json.loads((tmp_path / f"process_{p}.json").read_text()) for p in range(2)]
    arrays = [np.load(tmp_path / f"process_{p}.npz") for p in range(2)]

    # Each process opened its own shards and no other (its disk holds no other).
    assert [f["type"] for f in facts] == ["ProcessShardedIndex"] * 2
    assert facts[0]["opened"] == {str(s): str(root / "host0" / shard_dir_name(s, 3))
                                  for s in (0, 2)}
    assert facts[1]["opened"] == {"1": str(root / "host1" / shard_dir_name(1, 3))}
    assert [f["one_opened"] for f in facts] == [[0], []]
    whole = open_index(root / "whole")  # one process, every shard
    assert isinstance(whole, ShardedIndex) and [f["num_docs"] for f in facts] == [60, 60]

    queries = np.load(root / "queries.npy")
    split = np.cumsum([0] + [len(x) for x in np.array_split(queries, 2)])

    def check(name, want, spans):
        for p, (lo, hi) in enumerate(spans):
            got, arr = facts[p][name], arrays[p]
            assert got["ids"] == want.ids[lo:hi], (name, p)
            for field in ("scores", "shards", "rows"):  # bit for bit
                np.testing.assert_array_equal(arr[f"{name}.{field}"],
                                              getattr(want, field)[lo:hi], err_msg=name)
            if want.latents is not None:
                np.testing.assert_array_equal(arr[f"{name}.latents"], want.latents[lo:hi])
            assert got["docs"] == (None if want.docs is None else want.docs[lo:hi])

    mine = [(split[p], split[p + 1]) for p in range(2)]
    want = whole.search(queries, 5, "scann", fetch=("latents", "docs"))
    check("scann", want, mine)
    # Query 0 is documents 1 and 2 (shards 1 and 2): an exact tie, the lower shard first.
    assert want.ids[0][:2] == ["doc1", "doc2"] and want.scores[0, 0] == want.scores[0, 1]
    deep = whole.search(queries, 25, "exact")  # k above each shard's 20 documents
    assert (deep.rows >= 0).all()
    check("exact_deep", deep, mine)
    check("uneven", whole.search(queries, 5, "auto"), [(0, len(queries)), (0, 0)])
    check("one", open_index(root / "one0").search(queries, 5, "scann", fetch=("latents",)),
          mine)

    # Look-ups by id reach the shards of the other process.
    for f, arr in zip(facts, arrays):
        assert f["live_ids"] == whole.live_ids()
        assert f["docs"] == whole.docs(f["wanted"]) and len(f["wanted"]) == 4
        np.testing.assert_array_equal(arr["latents_of_wanted"], whole.latents(f["wanted"]))
    assert "missing_doc" not in facts[0] and "'no such id' is not in the index" in \
        facts[1]["missing_doc"]
    # A missing shard, seen by process 1 only, is raised on both.
    for f in facts:
        assert shard_dir_name(1, 3) in f["missing_shard"]
        assert "(on process 1 of 2)" in f["missing_shard"]
