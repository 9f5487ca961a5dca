"""A sharded index searched by several JAX processes, each holding only its own shards.

With more than one JAX process (multi-host `clara eval`, `clara ask`), `open_index` of a
sharded directory (`shard-IIIII-of-NNNNN/`, one per host from `clara index build`) returns
a `ProcessShardedIndex`: process p of P opens only the shards i with i % P == p
(`assigned_shards`), so each host reads and keeps only its own part of the index, and
needs only its own shards on its disk (no shared file system). With N shards:
- N == P (what a P-process `clara index build` writes): one shard per process;
- N > P: process p holds shards p, p + P, ... (one more on the first N % P processes);
- N < P: processes N .. P-1 hold no shard; they search nothing, take part in every
  exchange all the same and get the same results as the others.
A plain index directory (one meta.json) is one complete index: every process opens it whole
and searches it on its own, as with one process.

Search is a collective (every process calls it, in the same order, each with its own query
batch of any size, empty included):
  1. the processes' query keys are gathered, so every process holds all Q = sum_p Q_p;
  2. each process searches its shards for the Q queries and merges them into one top-k
     (`merge_topk`);
  3. these (score, shard, row) lists are gathered and merged (`merge_ranked`) into one top-k
     per query, identical on every process and identical to what one process searching every
     shard gets (`ShardedIndex.search`): by score, then lower shard, then the shard's rank;
  4. the process holding each result sends its id (and, when fetched, its stored latents or
     audit record), so that no process reads another's store.
Each process keeps the rows of its own queries. Every process receives all P processes'
results, not only its own: Q x k ids (and Q x k x M x L latents when fetched) per search.

A process that raised before an exchange would leave the others waiting in it. So opening
reports every process's error through its exchange and all processes raise the first one,
and a search checks its arguments against what every process knows before the first
exchange. Document ids are not compared across processes (that would gather every id);
`clara index build` gives each document to one shard.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np

from clara_jax.distributed import allgather_arrays, allgather_json
from clara_jax.index.index import (
    BUILD,
    IDENTITY_FIELDS,
    META,
    LatentIndex,
    SearchResult,
    check_fetch,
    check_identity,
    query_keys,
    read_results,
    resolve_ids,
    shard_dir_name,
)
from clara_jax.index.search import merge_ranked, merge_topk
from clara_jax.index.store import IndexFileError, IndexMismatchError

_SHARD_DIR = re.compile(r"shard-(\d+)-of-(\d+)$")
# Errors that cross processes keep their type; anything else arrives as a ValueError.
_ERRORS = {e.__name__: e for e in (IndexFileError, IndexMismatchError, KeyError, ValueError)}


def assigned_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """The shards process `process_index` of `process_count` opens: i with i % P == p."""
    return list(range(process_index, num_shards, process_count))


def _local_view(path: Path) -> dict:
    """What this process sees at `path`: a plain index, and which shard directories."""
    shards = []
    if path.is_dir():
        for p in path.iterdir():
            m = _SHARD_DIR.match(p.name)
            if m and p.is_dir():
                shards.append([int(m.group(1)), int(m.group(2))])
    return {"plain": (path / META).exists() or (path / BUILD).exists(), "shards": sorted(shards)}


def _raise_first(reports: list[dict]) -> None:
    """Raises, on every process alike, the first error any process reported."""
    for p, r in enumerate(reports):
        if r.get("error"):
            kind, msg = r["error"]
            raise _ERRORS.get(kind, ValueError)(f"{msg} (on process {p} of {len(reports)})")


def _error(e: Exception) -> list:
    return [type(e).__name__ if type(e).__name__ in _ERRORS else "ValueError",
            str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)]


def open_on_processes(path, identity: dict | None = None):
    """`open_index` with several JAX processes (a collective): a ProcessShardedIndex of this
    process's shards of a sharded directory, or the whole LatentIndex of a plain one."""
    path = Path(path)
    views = allgather_json(_local_view(path))
    if all(v["plain"] for v in views):
        return LatentIndex.open(path, identity)
    counts = sorted({n for v in views for _, n in v["shards"]})
    where = f"{path} (as seen by processes {', '.join(str(p) for p in range(len(views)))})"
    if any(v["plain"] for v in views):
        raise IndexFileError(f"{where}: a plain index on some processes and shard directories "
                             "on others")
    if not counts:
        raise IndexFileError(f"{path / META}: missing (and no shard-*-of-* directories)")
    if len(counts) > 1:
        raise IndexFileError(f"{where}: shard directories of different counts {counts} (one "
                             "sharded index per directory)")
    return ProcessShardedIndex.open(path, counts[0], identity)


class ProcessShardedIndex:
    """This process's shards of a sharded index, searched with the other processes' shards as
    one index (module doc). Open with `open_index` (or `ProcessShardedIndex.open`) on every
    process. Methods that exchange with the other processes are collectives (module doc);
    `num_docs`, `keys` and the attributes are local.

    Attributes: path; num_shards; local {shard number: LatentIndex} (the shards this process
    opened); shard_info [num_shards] {'path', 'num_docs', 'scann', 'process'} of every shard;
    identity, key, m, latent_width (the same on every process)."""

    def __init__(self, path: Path, num_shards: int, local: dict[int, LatentIndex],
                 shard_info: list[dict]):
        self.path, self.num_shards, self.local, self.shard_info = path, num_shards, local, \
            shard_info
        first = shard_info[0]
        self.identity, self.key = first["identity"], first["key"]
        self.m, self.latent_width = first["m"], first["latent_width"]
        self.process_index, self.process_count = jax.process_index(), jax.process_count()

    @classmethod
    def open(cls, path, num_shards: int, identity: dict | None = None) -> ProcessShardedIndex:
        """Opens shards `assigned_shards(num_shards, this process, P)` of `path` (a
        collective). With `identity`, refuses shards built by another compressor
        (IndexMismatchError); a missing or damaged shard raises IndexFileError naming it; any
        process's error is raised on every process."""
        path = Path(path)
        p, n = jax.process_index(), jax.process_count()
        local, report = {}, {"error": None, "shards": {}}
        try:
            for i in assigned_shards(num_shards, p, n):
                d = path / shard_dir_name(i, num_shards)
                if not d.is_dir():
                    raise IndexFileError(f"{d}: missing shard (process {p} of {n} opens "
                                         f"shards {assigned_shards(num_shards, p, n)})")
                s = local[i] = LatentIndex.open(d, identity)
                report["shards"][str(i)] = {
                    "path": str(d), "num_docs": s.num_docs, "scann": s.scann is not None,
                    "identity": {f: s.identity[f] for f in IDENTITY_FIELDS}, "key": s.key,
                    "m": s.m, "latent_width": s.latent_width, "process": p}
        except (IndexFileError, IndexMismatchError, ValueError, OSError) as e:
            report["error"] = _error(e)
        reports = allgather_json(report)
        _raise_first(reports)
        info = {int(i): r for rep in reports for i, r in rep["shards"].items()}
        shard_info = [info[i] for i in range(num_shards)]  # each shard has one process
        first = shard_info[0]
        for s in shard_info[1:]:
            check_identity(first["identity"], s["identity"],
                           f"{s['path']} (merged with {first['path']})")
            if s["key"] != first["key"]:
                raise IndexMismatchError(f"{s['path']}: key type {s['key']!r}, shard "
                                         f"{first['path']} uses {first['key']!r}")
        return cls(path, num_shards, local, shard_info)

    # -- local facts
    @property
    def num_docs(self) -> int:
        return sum(s["num_docs"] for s in self.shard_info)

    def check_identity(self, identity: dict) -> None:
        check_identity(self.identity, identity, str(self.path))

    def keys(self, latents) -> np.ndarray:
        """Query latents float[Q, M, L] (or [M, L]) -> keys float32[Q, K]."""
        return query_keys(latents, self.m, self.latent_width, self.key, self.path)

    def _owner(self, shard: np.ndarray) -> np.ndarray:
        """int64[...] shard numbers (-1: none) -> the process holding each (-1: none)."""
        return np.where(shard >= 0, shard % self.process_count, -1)

    # -- collectives
    def search(self, latents, k: int = 10, backend: str = "auto", fetch=(), **kw
               ) -> SearchResult:
        """This process's query latents float[Q_p, M, L] -> their top-k over every shard of
        every process (module doc), with the results' stored latents and / or audit records
        when `fetch` names them. A collective. Returns the SearchResult of this process's
        queries: ids [Q_p][k], rows / shards int64[Q_p, k] (rows of the shard's store;
        shards numbered as in the directory), scores float32[Q_p, k]."""
        # Checks every process makes alike, before anything is exchanged.
        fetch = check_fetch(fetch)
        if int(k) <= 0:
            raise ValueError(f"k={k}: must be positive")
        if backend not in ("auto", "scann", "exact"):
            raise ValueError(f"backend={backend!r}: must be 'auto', 'scann' or 'exact'")
        if backend == "scann":
            bare = [s["path"] for s in self.shard_info if not s["scann"]]
            if bare:
                raise ValueError(f"{bare[0]}: no ScaNN searcher in this shard (built with "
                                 "scann off); use backend='exact'")
        keys = self.keys(latents)

        # 1. every process's queries, in process order
        gathered = [g["keys"] for g in allgather_arrays({"keys": keys})]
        sizes = [len(g) for g in gathered]
        lo = sum(sizes[:self.process_index])
        everyone = np.concatenate(gathered)  # one entry per process, never empty
        total = len(everyone)

        # 2. this process's shards, merged (shard numbers of the directory)
        mine = sorted(self.local)
        if mine and total:
            parts = [self.local[i].search_keys(everyone, k, backend, **kw) for i in mine]
            pos, rows, scores = merge_topk(parts, k)
            shard = np.where(pos >= 0, np.asarray(mine, np.int64)[pos.clip(0)], -1)
        else:
            shard = np.full((total, k), -1, np.int64)
            rows = np.full((total, k), -1, np.int64)
            scores = np.full((total, k), -np.inf, np.float32)

        # 3. every process's lists, merged into one top-k (the same on every process)
        lists = allgather_arrays({"shard": shard, "rows": rows, "scores": scores})
        shard, rows, scores = merge_ranked(
            np.concatenate([x["shard"] for x in lists], axis=1),
            np.concatenate([x["rows"] for x in lists], axis=1),
            np.concatenate([x["scores"] for x in lists], axis=1), k)

        # 4. ids (and what is fetched) from the process holding each result
        owner = self._owner(shard).reshape(-1)
        flat_shard, flat_rows = shard.reshape(-1), rows.reshape(-1)
        held = np.nonzero(owner == self.process_index)[0]
        ids = [self.local[int(s)].ids[int(r)] for s, r in zip(flat_shard[held], flat_rows[held])]
        lat, docs = read_results(self.local, flat_shard[held], flat_rows[held], fetch, self.m,
                                 self.latent_width)
        sent = allgather_json({"ids": ids, "docs": docs})
        lat_sent = (allgather_arrays({"latents": lat}) if lat is not None else None)

        # This process's rows [lo, lo + Q_p) of the Q x k results.
        q = sizes[self.process_index]
        start, stop = lo * k, (lo + q) * k
        out_ids: list = [None] * (q * k)
        out_docs = [None] * (q * k) if "docs" in fetch else None
        out_lat = (np.zeros((q * k, self.m, self.latent_width), np.float32)
                   if "latents" in fetch else None)
        for p in range(self.process_count):
            at = np.nonzero(owner == p)[0]  # the order process p sent them in
            keep = np.nonzero((at >= start) & (at < stop))[0]
            for j in keep:
                out_ids[at[j] - start] = sent[p]["ids"][j]
                if out_docs is not None:
                    out_docs[at[j] - start] = sent[p]["docs"][j]
            if out_lat is not None:
                out_lat[at[keep] - start] = lat_sent[p]["latents"][keep]
        per_query = lambda flat: [flat[i * k:(i + 1) * k] for i in range(q)]
        return SearchResult(
            per_query(out_ids), rows[lo:lo + q], scores[lo:lo + q], shard[lo:lo + q],
            None if out_lat is None else out_lat.reshape(q, k, self.m, self.latent_width),
            None if out_docs is None else per_query(out_docs))

    def live_ids(self) -> list[str]:
        """The ids of every shard's live documents, in shard then row order (the order one
        process's `ShardedIndex.live_ids` gives). A collective."""
        parts = allgather_json({str(i): s.live_ids() for i, s in self.local.items()})
        by_shard = {int(i): ids for part in parts for i, ids in part.items()}
        return [d for i in range(self.num_shards) for d in by_shard[i]]

    def resolve(self, ids) -> list[str]:
        """Stored ids for document or chunk ids (`resolve_ids`), over every shard. A
        collective."""
        return resolve_ids(self.live_ids(), list(ids), f"{self.path} ({self.num_shards} shards)")

    def _held(self, ids) -> dict[int, list[str]]:
        """Gathers every process's requested ids; returns, per shard of this process, the
        requested live ids it holds (in request order)."""
        asked = allgather_json(list(ids))
        wanted = list(dict.fromkeys(i for a in asked for i in a))
        return {n: [i for i in wanted if i in s.row_of and not s.deleted[s.row_of[i]]]
                for n, s in sorted(self.local.items())}

    def _missing(self, ids, got) -> None:
        missing = [i for i in ids if i not in got]
        if missing:
            raise KeyError(f"document id {missing[0]!r} is not in the index {self.path} "
                           f"({self.num_shards} shards)")

    def docs(self, ids) -> list[dict]:
        """The audit records of documents by id, from whichever process holds them; KeyError
        for an id in no shard. A collective (each process asks for its own ids)."""
        held = self._held(ids)
        mine = {i: rec for n, here in held.items() for i, rec in
                zip(here, self.local[n].docs(here))}
        got = {i: rec for part in allgather_json(mine) for i, rec in part.items()}
        self._missing(ids, got)
        return [got[i] for i in ids]

    def doc(self, doc_id: str) -> dict:
        """One audit record (`docs`). A collective."""
        return self.docs([doc_id])[0]

    def latents(self, ids) -> np.ndarray:
        """Stored latents of documents by id -> float32[n, M, L], from whichever process holds
        them; KeyError for an id in no shard. A collective (each process asks for its own
        ids)."""
        held = self._held(ids)
        found = [i for here in held.values() for i in here]
        lat = [self.local[n].latents(here) for n, here in held.items() if here]
        mine = (np.concatenate(lat) if lat
                else np.zeros((0, self.m, self.latent_width), np.float32))
        got = {}
        for part, names in zip(allgather_arrays({"latents": mine}), allgather_json(found)):
            got.update(zip(names, part["latents"]))
        self._missing(ids, got)
        return (np.stack([got[i] for i in ids]) if len(ids)
                else np.zeros((0, self.m, self.latent_width), np.float32))

    # -- updates are one process's job
    def _read_only(self, *_args, **_kw):
        raise ValueError(f"{self.path}: a sharded index opened by {self.process_count} "
                         "processes is read-only; add to or delete from it as one process")

    add = delete = _read_only
