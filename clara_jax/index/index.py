"""A latent index directory: build (resumably), open with safety checks, search, update.

    <index>/meta.json        format, model identity, latent shape, dtype, key type, build
                             times, and the manifest (size + sha256) of every chunk record,
                             the tombstones and the ScaNN files. Written last, atomically: it
                             is the commit point of a build or an update.
    <index>/build.json       the build's settings, so an interrupted build resumes only with
                             the same model and settings.
    <index>/store/           the latent store and audit text (see `clara_jax.index.store`).
    <index>/deleted-{g}.npy  int64 store rows deleted (tombstones), generation g.
    <index>/scann-{g}/       ScaNN assets + rows.npy (ScaNN datapoint -> store row).

Updates (`add`, `delete`) write new files under a new generation number and then a new
meta.json; the previous generation's files are removed only after it, so a crash leaves the
last committed index readable.

Sharded indexes are directories `shard-{i:05d}-of-{n:05d}/`, each a complete index built on
its own (one per host); `ShardedIndex` searches all and merges them into one top-k. With
several JAX processes, `open_index` gives each process only its own shards instead
(`clara_jax.index.multihost`).
"""

from __future__ import annotations

import datetime
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from clara_jax.fileio import check_format
from clara_jax.index.scann_index import ScannIndex, ScannParams, replace_dir
from clara_jax.index.search import KEY_TYPES, ExactSearcher, key_width, merge_topk, retrieval_keys
from clara_jax.index.store import (
    DTYPES,
    Chunk,
    IndexFileError,
    IndexMismatchError,
    LatentStore,
    atomic_save_npy,
    atomic_write_json,
    check_file,
    chunk_name,
    file_record,
    load_chunk_record,
    load_npy,
    read_json,
    require_field,
    write_chunk,
)

FORMAT = "clara_jax.latent_index"
FORMAT_VERSION = 1
META = "meta.json"
BUILD = "build.json"
IDENTITY_FIELDS = ("config_hash", "params_checksum", "num_memory_tokens", "latent_width")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def shard_dir_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def check_identity(index_identity: dict, model_identity: dict, where: str) -> None:
    """Raises IndexMismatchError naming each field that differs."""
    bad = [f for f in IDENTITY_FIELDS if index_identity.get(f) != model_identity.get(f)]
    if bad:
        detail = "; ".join(f"{f}: index {index_identity.get(f)!r} != model "
                           f"{model_identity.get(f)!r}" for f in bad)
        raise IndexMismatchError(
            f"{where}: the index was built by a different compressor ({detail}). Rebuild the "
            "index with this checkpoint, or open it with the checkpoint that built it.")


FETCH = ("latents", "docs")


@dataclass
class SearchResult:
    """ids: list[list[str | None]] [Q][k]; rows: int64[Q, k] (-1: no result);
    scores: float32[Q, k] cosine similarities of the keys (-inf: no result);
    shards: int64[Q, k] (which shard, for sharded indexes; zeros otherwise);
    latents: float32[Q, k, M, L], the results' stored latents (zeros where no result), and
    docs: [Q][k] their audit records (None where no result) — each only when the search was
    asked to fetch it (`fetch=`), else None."""
    ids: list
    rows: np.ndarray
    scores: np.ndarray
    shards: np.ndarray
    latents: np.ndarray | None = None
    docs: list | None = None

    def take(self, queries) -> SearchResult:
        """The results of the given query positions (int[n]), in that order."""
        q = [int(i) for i in queries]
        return SearchResult([self.ids[i] for i in q], self.rows[q], self.scores[q],
                            self.shards[q], None if self.latents is None else self.latents[q],
                            None if self.docs is None else [self.docs[i] for i in q])


def check_fetch(fetch) -> tuple[str, ...]:
    fetch = tuple(fetch)
    bad = [f for f in fetch if f not in FETCH]
    if bad:
        raise ValueError(f"fetch={fetch}: {bad[0]!r} is not one of {FETCH}")
    return fetch


def read_results(shards: dict, shard: np.ndarray, rows: np.ndarray, fetch, m: int,
                 latent_width: int):
    """What `fetch` asks for of results held by `shards` ({shard number: LatentIndex}).
    shard, rows: int64[n] (every entry a result of one of `shards`). Returns (latents
    float32[n, M, L] or None, records [n] or None)."""
    fetch = check_fetch(fetch)
    latents = docs = None
    if "latents" in fetch:
        latents = np.zeros((len(rows), m, latent_width), np.float32)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            latents[sel] = shards[int(s)].store.read_rows(rows[sel])
    if "docs" in fetch:
        docs = [shards[int(s)].store.doc(int(r)) for s, r in zip(shard, rows)]
    return latents, docs


def _with_fetched(res: SearchResult, shards: dict, fetch, m: int, latent_width: int
                  ) -> SearchResult:
    """`res` with what `fetch` asks for read from the stores of `shards`."""
    if not check_fetch(fetch):
        return res
    q, k = res.rows.shape
    found = np.nonzero(res.rows.reshape(-1) >= 0)[0]
    lat, docs = read_results(shards, res.shards.reshape(-1)[found], res.rows.reshape(-1)[found],
                             fetch, m, latent_width)
    if lat is not None:
        res.latents = np.zeros((q * k, m, latent_width), np.float32)
        res.latents[found] = lat
        res.latents = res.latents.reshape(q, k, m, latent_width)
    if docs is not None:
        flat = [None] * (q * k)
        for i, d in zip(found, docs):
            flat[i] = d
        res.docs = [flat[i * k:(i + 1) * k] for i in range(q)]
    return res


def query_keys(latents, m: int, latent_width: int, key: str, where) -> np.ndarray:
    """Query latents float[Q, M, L] (or [M, L]) -> keys float32[Q, K]; IndexMismatchError
    (naming `where`) for latents of another shape."""
    q = np.asarray(latents, np.float32)
    q = q[None] if q.ndim == 2 else q
    if q.shape[1:] != (m, latent_width):
        raise IndexMismatchError(f"{where}: query latents have shape {q.shape[1:]}, the index "
                                 f"holds [M={m}, L={latent_width}]")
    return retrieval_keys(q, key)


# ----------------------------------------------------------------------------- building

class IndexBuilder:
    """Writes the chunks of a new index, resumably, then commits it with `finalize`.

    identity: `model_identity(cfg, params)`; dtype: one of DTYPES; key: one of KEY_TYPES;
    chunk_size: documents per chunk (the unit of resumption)."""

    def __init__(self, path, identity: dict, dtype: str = "float32", key: str = "flat",
                 chunk_size: int = 16384, shard: tuple[int, int] = (0, 1)):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: must be one of {DTYPES}")
        if key not in KEY_TYPES:
            raise ValueError(f"key={key!r}: must be one of {KEY_TYPES}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size={chunk_size}: must be positive")
        self.path = Path(path)
        self.store_dir = self.path / "store"
        self.identity = dict(identity)
        self.m, self.latent_width = identity["num_memory_tokens"], identity["latent_width"]
        self.settings = {"format": FORMAT, "format_version": FORMAT_VERSION,
                         "identity": self.identity, "dtype": dtype, "key": key,
                         "chunk_size": chunk_size, "shard": list(shard)}
        self.dtype, self.key, self.chunk_size, self.shard = dtype, key, chunk_size, shard
        self.started = time.time()
        if (self.path / META).exists():
            raise FileExistsError(f"{self.path / META}: an index is already committed here; "
                                  "choose a new output directory")
        build = self.path / BUILD
        if build.exists():
            prev = read_json(build, "build settings")
            if prev != self.settings:
                diff = sorted(k for k in set(prev) | set(self.settings)
                              if prev.get(k) != self.settings.get(k))
                raise IndexMismatchError(
                    f"{build}: an interrupted build with different settings ({', '.join(diff)}) "
                    "is in this directory; resume it with the same model and settings, or use "
                    "a new output directory")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(build, self.settings)
        self.store_dir.mkdir(parents=True, exist_ok=True)

    def chunk_done(self, k: int, ids=None) -> bool:
        """Whether chunk k was committed by an earlier (interrupted) run and is intact. With
        `ids` (the documents chunk k must hold now), a chunk of other documents is refused:
        the corpus changed since the interrupted run."""
        record = self.store_dir / f"{chunk_name(k)}.json"
        if not record.exists():
            return False
        try:
            chunk = load_chunk_record(record, self.dtype, self.m, self.latent_width)
            for frec in chunk.files.values():
                check_file(self.store_dir / frec["name"], frec)
        except IndexFileError:
            return False  # damaged by the interruption: it is written again
        if ids is not None and list(ids) != chunk.ids:
            raise IndexMismatchError(
                f"{record}: the interrupted build encoded other documents in chunk {k} (the "
                "corpus changed); use a new output directory")
        return chunk.start == k * self.chunk_size

    def write_chunk(self, k: int, latents: np.ndarray, ids, titles=None, texts=None) -> None:
        """latents: float[n, M, L] for documents k*chunk_size ... (n <= chunk_size)."""
        latents = np.asarray(latents)
        if latents.shape[1:] != (self.m, self.latent_width):
            raise ValueError(f"chunk {k}: latents {latents.shape}, expected [n, {self.m}, "
                             f"{self.latent_width}]")
        if latents.shape[0] > self.chunk_size:
            raise ValueError(f"chunk {k}: {latents.shape[0]} rows > chunk_size")
        write_chunk(self.store_dir, k, k * self.chunk_size, latents, list(ids), self.dtype,
                    titles, texts)

    def finalize(self, num_chunks: int, scann: bool | ScannParams | dict = True,
                 extra: dict | None = None) -> LatentIndex:
        """Checks chunks 0..num_chunks-1, builds the ScaNN searcher and commits meta.json.
        Returns the opened index. scann: False (exact search only), True
        (`ScannParams.auto(num_docs)`), a dict of overrides of the auto parameters, or
        ScannParams."""
        chunks = []
        for k in range(num_chunks):
            record = self.store_dir / f"{chunk_name(k)}.json"
            chunk = load_chunk_record(record, self.dtype, self.m, self.latent_width)
            if k < num_chunks - 1 and chunk.count != self.chunk_size:
                raise IndexFileError(f"{record}: {chunk.count} rows in a non-final chunk")
            chunks.append(chunk)
        store = LatentStore(self.store_dir, self.dtype, self.m, self.latent_width, chunks)
        ids = store.ids()
        if len(set(ids)) != len(ids):
            seen, dup = set(), None
            for i in ids:
                if i in seen:
                    dup = i
                    break
                seen.add(i)
            raise ValueError(f"duplicate document id {dup!r} in the corpus")
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "identity": self.identity,
            "latent_shape": [store.num_rows, self.m, self.latent_width],
            "num_docs": store.num_rows, "dtype": self.dtype, "key": self.key,
            "chunk_size": self.chunk_size, "shard": list(self.shard),
            "build_time": _now(), "generation": 0, "deleted": None, "scann": None,
            "chunks": [{"name": c.record_path.name, **file_record(c.record_path)}
                       for c in chunks],
            "extra": extra or {},
        }
        built = None
        if scann:
            if isinstance(scann, ScannParams):
                params = scann
            else:
                params = ScannParams.auto(store.num_rows,
                                          **(scann if isinstance(scann, dict) else {}))
            keys = _store_keys(store, self.key)
            built = ScannIndex.build(keys, np.arange(store.num_rows), params)
            del keys
            meta["scann"] = _write_scann(self.path, 0, built)
        meta["build_seconds"] = round(time.time() - self.started, 3)
        atomic_write_json(self.path / META, meta)
        (self.path / BUILD).unlink(missing_ok=True)
        # Everything else is checked by a normal open; the searcher just serialised is kept
        # rather than loaded a second time.
        index = LatentIndex.open(self.path, load_scann=False)
        index.scann = built
        return index


def _store_keys(store: LatentStore, key: str, rows=None) -> np.ndarray:
    """Retrieval keys of the store (or of `rows`), float32[n, K], block by block."""
    if rows is not None:
        return retrieval_keys(store.read_rows(rows), key)
    k = key_width(key, store.m, store.latent_width)
    out = np.empty((store.num_rows, k), np.float32)
    for start, block in store.iter_blocks():
        out[start:start + len(block)] = retrieval_keys(block, key)
    return out


def _write_scann(path: Path, generation: int, scann: ScannIndex) -> dict:
    name = f"scann-{generation}"
    tmp = path / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    files = scann.serialize(tmp)
    replace_dir(tmp, path / name)
    return {"dir": name, "params": scann.params.to_json(), "files": files}


# ----------------------------------------------------------------------------- reading

def resolve_ids(live_ids, ids, where) -> list[str]:
    """The stored ids that `ids` name: a stored id (an unchunked document's `ID`, or a chunk
    `ID#k`) names itself; the plain id of a chunked document names all its live chunks, in
    chunk order. live_ids: the index's live ids, in order; where: the index, for the error.
    Raises KeyError naming the first id that names nothing."""
    live = set(live_ids)
    chunks: dict[str, list[str]] | None = None
    out = []
    for doc_id in ids:
        if doc_id in live:
            out.append(doc_id)
            continue
        if chunks is None:
            chunks = {}
            for i in live_ids:
                base, sep, k = i.rpartition("#")
                if sep and k.isdigit():
                    chunks.setdefault(base, []).append(i)
        found = sorted(chunks.get(doc_id, ()), key=lambda i: int(i.rpartition("#")[2]))
        if not found:
            raise KeyError(f"document id {doc_id!r} is not in the index {where} "
                           f"(nor is any chunk {doc_id}#k)")
        out += found
    return out


class LatentIndex:
    """An opened index. Load with `LatentIndex.open(path, identity=...)`."""

    def __init__(self, path: Path, meta: dict, store: LatentStore, deleted: np.ndarray,
                 scann: ScannIndex | None):
        self.path, self.meta, self.store = path, meta, store
        self.identity = meta["identity"]
        self.key = meta["key"]
        self.m, self.latent_width = store.m, store.latent_width
        self.ids = store.ids()
        self.row_of = {i: r for r, i in enumerate(self.ids)}
        self.deleted = np.zeros(store.num_rows, bool)
        self.deleted[deleted] = True
        self.scann = scann
        self._exact: ExactSearcher | None = None

    # -- opening
    @classmethod
    def open(cls, path, identity: dict | None = None, load_scann: bool = True) -> LatentIndex:
        """Opens the index at `path`. With `identity` (`model_identity(cfg, params)`), refuses
        an index built by another compressor (IndexMismatchError). Missing, truncated or
        corrupted files raise IndexFileError naming the file."""
        path = Path(path)
        meta_path = path / META
        if not meta_path.exists() and (path / BUILD).exists():
            raise IndexFileError(f"{meta_path}: missing; {path} holds an unfinished build "
                                 "(run the build again to resume it)")
        meta = read_json(meta_path, "index metadata")
        check_format(meta, meta_path, FORMAT, FORMAT_VERSION, IndexFileError)
        ident = require_field(meta, "identity", meta_path, dict)
        for f in IDENTITY_FIELDS:
            require_field(ident, f, meta_path)
        if identity is not None:
            check_identity(ident, identity, str(path))
        dtype = require_field(meta, "dtype", meta_path, str)
        if dtype not in DTYPES:
            raise IndexFileError(f"{meta_path}: field 'dtype' is {dtype!r}, not one of {DTYPES}")
        key = require_field(meta, "key", meta_path, str)
        if key not in KEY_TYPES:
            raise IndexFileError(f"{meta_path}: field 'key' is {key!r}, not one of {KEY_TYPES}")
        m, lw = ident["num_memory_tokens"], ident["latent_width"]
        store_dir = path / "store"
        chunks: list[Chunk] = []
        for rec in require_field(meta, "chunks", meta_path, list):
            record_path = store_dir / rec["name"]
            check_file(record_path, rec)
            chunks.append(load_chunk_record(record_path, dtype, m, lw))
        for prev, cur in zip(chunks, chunks[1:]):
            if cur.start != prev.stop:
                raise IndexFileError(f"{cur.record_path}: starts at row {cur.start}, expected "
                                     f"{prev.stop}")
        store = LatentStore(store_dir, dtype, m, lw, chunks)
        shape = require_field(meta, "latent_shape", meta_path, list)
        if shape != [store.num_rows, m, lw]:
            raise IndexFileError(f"{meta_path}: field 'latent_shape' is {shape}, the store "
                                 f"holds {[store.num_rows, m, lw]}")
        deleted = np.zeros(0, np.int64)
        if meta.get("deleted"):
            drec = meta["deleted"]
            check_file(path / drec["name"], drec)
            deleted = load_npy(path / drec["name"], mmap=False).astype(np.int64)
        scann = None
        if meta.get("scann") and load_scann:
            s = meta["scann"]
            try:
                scann = ScannIndex.load(path / s["dir"], s["files"],
                                        ScannParams.from_json(s["params"]),
                                        key_width(key, m, lw))
            except ImportError as e:  # no ScaNN wheel on this platform: exact search serves
                logging.warning("%s: ScaNN is not importable (%s); searching exactly", path, e)
        return cls(path, meta, store, deleted, scann)

    def check_identity(self, identity: dict) -> None:
        """Refuses (IndexMismatchError) a model whose identity differs from the index's."""
        check_identity(self.identity, identity, str(self.path))

    # -- contents
    @property
    def num_docs(self) -> int:
        return int((~self.deleted).sum())

    def live_ids(self) -> list[str]:
        """The ids of the documents not deleted, in row order."""
        return [i for i, dead in zip(self.ids, self.deleted) if not dead]

    def resolve(self, ids) -> list[str]:
        """Stored ids for document or chunk ids (`resolve_ids`)."""
        return resolve_ids(self.live_ids(), list(ids), self.path)

    def latents(self, ids) -> np.ndarray:
        """Stored latents of documents by id -> float32[n, M, L] (dequantised)."""
        return self.store.read_rows([self._row(i) for i in ids])

    def doc(self, doc_id: str) -> dict:
        """The audit record {'id', 'title'?, 'text'?} (never needed to answer)."""
        return self.store.doc(self._row(doc_id))

    def docs(self, ids) -> list[dict]:
        """The audit records of documents by id."""
        return [self.doc(i) for i in ids]

    def _row(self, doc_id: str) -> int:
        row = self.row_of.get(doc_id)
        if row is None or self.deleted[row]:
            raise KeyError(f"document id {doc_id!r} is not in the index {self.path}")
        return row

    # -- search
    def keys(self, latents) -> np.ndarray:
        """Query latents float[Q, M, L] (or [M, L]) -> keys float32[Q, K]."""
        return query_keys(latents, self.m, self.latent_width, self.key, self.path)

    def exact_searcher(self) -> ExactSearcher:
        if self._exact is None:
            self._exact = ExactSearcher(_store_keys(self.store, self.key), ~self.deleted)
        return self._exact

    def search_keys(self, keys: np.ndarray, k: int = 10, backend: str = "auto",
                    leaves_to_search: int | None = None, reorder: int | None = None):
        """keys float32[Q, K] -> (rows int64[Q, k], scores float32[Q, k]).
        backend: 'scann', 'exact', or 'auto' (ScaNN when built, else exact)."""
        if len(keys) == 0:  # e.g. a process's empty batch in a multi-process search
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        if backend == "auto":
            backend = "scann" if self.scann is not None else "exact"
        if backend == "scann":
            if self.scann is None:
                raise ValueError(f"{self.path}: no ScaNN searcher in this index (built with "
                                 "scann off); use backend='exact'")
            return self.scann.search(keys, k, leaves_to_search, reorder)
        if backend == "exact":
            return self.exact_searcher().search(keys, k)
        raise ValueError(f"backend={backend!r}: must be 'auto', 'scann' or 'exact'")

    def search(self, latents, k: int = 10, backend: str = "auto", fetch=(), **kw
               ) -> SearchResult:
        """Query latents float[Q, M, L] (or one query [M, L]) -> the top-k documents, with
        their stored latents and / or audit records when `fetch` names them (FETCH)."""
        rows, scores = self.search_keys(self.keys(latents), k, backend, **kw)
        ids = [[self.ids[r] if r >= 0 else None for r in row] for row in rows]
        res = SearchResult(ids, rows, scores, np.zeros_like(rows))
        return _with_fetched(res, {0: self}, fetch, self.m, self.latent_width)

    # -- updates
    def _commit(self, meta: dict, old_files: list[Path]) -> None:
        meta["updated_time"] = _now()
        atomic_write_json(self.path / META, meta)
        self.meta = meta
        for p in old_files:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    def add(self, latents, ids, titles=None, texts=None) -> None:
        """Appends documents (latents float[n, M, L], new unique ids) as a new chunk and adds
        their keys to ScaNN without retraining it; commits a new generation."""
        latents = np.asarray(latents, np.float32)
        ids = list(ids)
        if latents.shape != (len(ids), self.m, self.latent_width):
            raise ValueError(f"add: latents {latents.shape} for {len(ids)} ids, expected "
                             f"[{len(ids)}, {self.m}, {self.latent_width}]")
        clash = [i for i in ids if i in self.row_of] + \
            [i for n, i in enumerate(ids) if i in ids[:n]]
        if clash:
            raise ValueError(f"add: document id {clash[0]!r} already exists (delete it first)")
        gen = self.meta["generation"] + 1
        k = (max(c.k for c in self.store.chunks) + 1) if self.store.chunks else 0
        start = self.store.num_rows
        record = write_chunk(self.store.store_dir, k, start, latents, ids, self.store.dtype,
                             titles, texts)
        chunk = load_chunk_record(record, self.store.dtype, self.m, self.latent_width)
        meta = dict(self.meta, generation=gen)
        meta["chunks"] = self.meta["chunks"] + [{"name": record.name, **file_record(record)}]
        rows = np.arange(start, start + len(ids))
        self.store.chunks.append(chunk)
        old = []
        if self.scann is not None:
            # Keys from the stored (possibly quantised) latents, as for the built ones.
            self.scann.upsert(retrieval_keys(self.store.read_rows(rows), self.key), rows)
            old.append(self.path / self.meta["scann"]["dir"])
            meta["scann"] = _write_scann(self.path, gen, self.scann)
        meta["latent_shape"] = [self.store.num_rows, self.m, self.latent_width]
        self.ids += ids
        self.row_of.update({i: int(r) for i, r in zip(ids, rows)})
        self.deleted = np.concatenate([self.deleted, np.zeros(len(ids), bool)])
        meta["num_docs"] = self.num_docs
        self._exact = None
        self._commit(meta, old)

    def delete(self, ids) -> None:
        """Removes documents by id (tombstones in the store, deleted from ScaNN); commits a
        new generation. A chunked document's plain id removes all its chunks. Their chunk
        files stay until a rebuild."""
        rows = [self._row(i) for i in self.resolve(ids)]
        gen = self.meta["generation"] + 1
        self.deleted[rows] = True
        name = f"deleted-{gen}.npy"
        atomic_save_npy(self.path / name, np.nonzero(self.deleted)[0].astype(np.int64))
        meta = dict(self.meta, generation=gen, num_docs=self.num_docs)
        meta["deleted"] = {"name": name, **file_record(self.path / name)}
        old = [self.path / self.meta["deleted"]["name"]] if self.meta.get("deleted") else []
        if self.scann is not None:
            self.scann.delete(rows)
            old.append(self.path / self.meta["scann"]["dir"])
            meta["scann"] = _write_scann(self.path, gen, self.scann)
        self._exact = None
        self._commit(meta, old)


class ShardedIndex:
    """Several indexes built independently (e.g. one per host), searched as one."""

    def __init__(self, shards: list[LatentIndex]):
        if not shards:
            raise ValueError("ShardedIndex needs at least one shard")
        first = shards[0]
        for s in shards[1:]:
            check_identity(first.identity, s.identity, f"{s.path} (merged with {first.path})")
            if s.key != first.key:
                raise IndexMismatchError(f"{s.path}: key type {s.key!r}, shard {first.path} "
                                         f"uses {first.key!r}")
        seen: dict[str, Path] = {}
        for s in shards:
            for i in s.ids:
                if i in seen:
                    raise ValueError(f"document id {i!r} is in both {seen[i]} and {s.path}")
                seen[i] = s.path
        self.shards = shards
        self.identity, self.key = first.identity, first.key
        self.m, self.latent_width = first.m, first.latent_width

    @classmethod
    def open(cls, paths, identity: dict | None = None) -> ShardedIndex:
        return cls([LatentIndex.open(p, identity) for p in paths])

    @property
    def num_docs(self) -> int:
        return sum(s.num_docs for s in self.shards)

    def check_identity(self, identity: dict) -> None:
        for s in self.shards:
            s.check_identity(identity)

    def keys(self, latents) -> np.ndarray:
        return self.shards[0].keys(latents)

    def search(self, latents, k: int = 10, backend: str = "auto", fetch=(), **kw
               ) -> SearchResult:
        """Every shard's top-k, merged into one top-k by score (`merge_topk`); `fetch` as
        for `LatentIndex.search`."""
        keys = self.keys(latents)
        parts = [s.search_keys(keys, k, backend, **kw) for s in self.shards]
        shard, rows, scores = merge_topk(parts, k)
        ids = [[self.shards[sh].ids[r] if r >= 0 else None for sh, r in zip(srow, rrow)]
               for srow, rrow in zip(shard, rows)]
        return _with_fetched(SearchResult(ids, rows, scores, shard), dict(enumerate(self.shards)),
                             fetch, self.m, self.latent_width)

    def live_ids(self) -> list[str]:
        return [i for s in self.shards for i in s.live_ids()]

    def resolve(self, ids) -> list[str]:
        """Stored ids for document or chunk ids (`resolve_ids`), over every shard."""
        return resolve_ids(self.live_ids(), list(ids),
                           f"{self.shards[0].path.parent} ({len(self.shards)} shards)")

    def delete(self, ids) -> None:
        """Deletes documents by id from whichever shards hold them (each shard commits its
        own new generation); a chunked document's plain id deletes all its chunks."""
        ids = self.resolve(ids)
        for s in self.shards:
            mine = [i for i in ids if i in s.row_of]
            if mine:
                s.delete(mine)

    def _holder(self, doc_id: str) -> LatentIndex:
        for s in self.shards:
            if doc_id in s.row_of:
                return s
        raise KeyError(f"document id {doc_id!r} is in no shard")

    def doc(self, doc_id: str) -> dict:
        return self._holder(doc_id).doc(doc_id)

    def docs(self, ids) -> list[dict]:
        """The audit records of documents by id."""
        return [self.doc(i) for i in ids]

    def latents(self, ids) -> np.ndarray:
        """Stored latents of documents by id -> float32[n, M, L] (dequantised)."""
        out = np.zeros((len(ids), self.m, self.latent_width), np.float32)
        for n, i in enumerate(ids):
            out[n] = self._holder(i).latents([i])[0]
        return out


def open_index(path, identity: dict | None = None):
    """A LatentIndex (directory with meta.json) or a ShardedIndex (directory of
    `shard-*-of-*` indexes, all of them present).

    With more than one JAX process this is a collective (every process opens the index):
    a sharded directory gives each process a `ProcessShardedIndex` of its own shards, a
    plain one a whole LatentIndex on every process (`clara_jax.index.multihost`)."""
    path = Path(path)
    if jax.process_count() > 1:
        # Not at the top: clara_jax.index.multihost imports this module (an import cycle).
        from clara_jax.index.multihost import open_on_processes

        return open_on_processes(path, identity)
    if (path / META).exists() or (path / BUILD).exists():
        return LatentIndex.open(path, identity)
    shard_dirs = sorted(path.glob("shard-*-of-*"))
    if not shard_dirs:
        raise IndexFileError(f"{path / META}: missing (and no shard-*-of-* directories)")
    count = int(shard_dirs[0].name.rsplit("-", 1)[1])
    want = [path / shard_dir_name(i, count) for i in range(count)]
    missing = [str(p) for p in want if not p.is_dir()]
    if missing:
        raise IndexFileError(f"{missing[0]}: missing shard ({len(missing)} of {count} missing)")
    return ShardedIndex.open(want, identity)


def progress(iterable, **kw):
    """tqdm with the project's defaults (used by the encoder and the CLI)."""
    return tqdm(iterable, dynamic_ncols=True, mininterval=1.0, **kw)
