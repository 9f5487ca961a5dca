"""ScaNN over retrieval keys, with the project's own id mapping and no pickles.

ScaNN's Python wrapper keeps document ids in `scann_docids.pkl` and `load_searcher` unpickles
it (which would run code from the index directory). This module drives the `scann_pybind`
searcher directly: it serialises only ScaNN's own assets (protobufs and `.npy` files, with
paths relative to the directory, so the directory can be moved) and keeps `rows.npy`
(int64[n]: ScaNN datapoint -> store row) itself. ScaNN's delete moves its last datapoint into
the freed slot; `delete` replays that on `rows` and checks ScaNN's answer agrees.
"""

from __future__ import annotations

import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clara_jax.index.store import IndexFileError, atomic_save_npy, check_file, file_record, load_npy


def _import_scann():
    """The pybind half of scann. Its package __init__ imports TensorFlow when installed; TF must
    never be loaded here, so it is blocked for the duration of the import."""
    blocked = "tensorflow" not in sys.modules
    if blocked:
        sys.modules["tensorflow"] = None  # makes `import tensorflow` raise ImportError
    try:
        from scann.scann_ops.py import scann_ops_pybind
    finally:
        if blocked:
            del sys.modules["tensorflow"]
    import scann_pybind
    return scann_ops_pybind, scann_pybind


@dataclass(frozen=True)
class ScannParams:
    """How the searcher is built and searched (defaults: `ScannParams.auto(n)`).

    num_leaves: k-means partitions (0: no partitioning, every point is scored);
    leaves_to_search: partitions scored per query; dims_per_block: asymmetric-hashing block
    width (2 = 16 centres per 2 dims); reorder: candidates re-scored with exact float dot
    products; training_sample: points used to train the partitioner; spherical: spherical
    k-means for the partitions (the keys are unit vectors: cosine); min_partition_size: ScaNN
    drops smaller partitions while training (capped at half the mean partition size of the
    training sample, else most leaves of a small sample would be dropped)."""
    num_leaves: int
    leaves_to_search: int
    dims_per_block: int = 2
    anisotropic_threshold: float = 0.2
    reorder: int = 100
    training_sample: int = 250_000
    num_neighbors: int = 10
    spherical: bool = True
    min_partition_size: int = 50

    @classmethod
    def auto(cls, n: int, **overrides) -> ScannParams:
        """Defaults by corpus size: ~sqrt(n) leaves, searching 5% of them but at least 24
        (small corpora have few, coarse leaves, and searching half of them costs little; on
        the bundled world's ~2200 chunks 16 of 46 leaves gave recall@10 0.95-0.96, 24 gave
        0.985); no partitioning below 2000 documents."""
        if n < 2000:
            p = cls(num_leaves=0, leaves_to_search=0)
        else:
            leaves = int(round(math.sqrt(n)))
            p = cls(num_leaves=leaves, leaves_to_search=min(leaves, max(24, leaves // 20)))
        return ScannParams(**{**p.__dict__, **overrides})

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> ScannParams:
        return cls(**d)


def scann_config(keys: np.ndarray, p: ScannParams) -> str:
    """The ScaNN config proto (text) for dot-product search over `keys` float32[n, K]."""
    ops, _ = _import_scann()
    n = keys.shape[0]
    b = ops.builder(keys, p.num_neighbors, "dot_product")
    if p.num_leaves:
        b = b.tree(num_leaves=p.num_leaves, num_leaves_to_search=p.leaves_to_search,
                   training_sample_size=min(n, max(p.training_sample, p.num_leaves)),
                   spherical=p.spherical,
                   min_partition_size=max(1, min(p.min_partition_size,
                                                 min(n, p.training_sample) // (2 * p.num_leaves))))
    b = b.score_ah(p.dims_per_block, anisotropic_quantization_threshold=p.anisotropic_threshold)
    b = b.reorder(p.reorder)
    return b.create_config()


class ScannIndex:
    """A ScaNN searcher over unit keys float32[n, K] and its map to store rows."""

    def __init__(self, searcher, rows: np.ndarray, params: ScannParams, dim: int):
        self.searcher = searcher
        self.rows = np.asarray(rows, np.int64)
        self.params = params
        self.dim = dim

    @classmethod
    def build(cls, keys: np.ndarray, rows: np.ndarray, params: ScannParams | None = None,
              threads: int = 0) -> ScannIndex:
        """keys: float32[n, K] unit-norm; rows: int64[n] store rows of the keys."""
        _, pybind = _import_scann()
        keys = np.ascontiguousarray(keys, np.float32)
        if keys.shape[0] == 0:
            raise ValueError("cannot build a ScaNN index over zero documents")
        params = params or ScannParams.auto(keys.shape[0])
        searcher = pybind.ScannNumpy(keys, scann_config(keys, params), threads)
        return cls(searcher, rows, params, keys.shape[1])

    @property
    def size(self) -> int:
        return len(self.rows)

    def search(self, queries: np.ndarray, k: int, leaves_to_search: int | None = None,
               reorder: int | None = None, parallel: bool = True):
        """queries: float32[Q, K] (or [K]) -> (rows int64[Q, k], scores float32[Q, k]),
        rows -1 / scores -inf where ScaNN returned fewer than k."""
        q = np.ascontiguousarray(queries, np.float32)
        single = q.ndim == 1
        q = q[None] if single else q
        if q.shape[1] != self.dim:
            raise ValueError(f"queries must be float32[Q, {self.dim}], got {q.shape}")
        leaves = -1 if leaves_to_search is None else leaves_to_search
        pre = -1 if reorder is None else max(reorder, k)
        if single:
            idx, dist = self.searcher.search(q[0], k, pre, leaves)
            idx, dist = [np.asarray(idx)], [np.asarray(dist)]
        else:
            idx, dist = self.searcher.search_batched(q, k, pre, leaves, parallel, 256)
        out_r = np.full((len(q), k), -1, np.int64)
        out_s = np.full((len(q), k), -np.inf, np.float32)
        for i, (ix, ds) in enumerate(zip(idx, dist)):
            ix = np.asarray(ix, np.int64)
            out_r[i, :len(ix)] = self.rows[ix]
            out_s[i, :len(ix)] = ds
        return out_r, out_s

    def upsert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Adds keys float32[n, K] for new store rows int64[n] (no retraining)."""
        keys = np.ascontiguousarray(keys, np.float32)
        got = self.searcher.upsert([None] * len(keys), keys, 256)
        want = list(range(self.size, self.size + len(keys)))
        if [int(g) for g in got] != want:
            raise RuntimeError(f"ScaNN upsert placed points at {got[:5]}..., expected {want[:5]}")
        self.rows = np.concatenate([self.rows, np.asarray(rows, np.int64)])

    def delete(self, rows) -> None:
        """Removes the datapoints of the given store rows."""
        pos_of = {int(r): i for i, r in enumerate(self.rows)}
        rows_list = self.rows.tolist()
        for r in rows:
            i = pos_of.pop(int(r))
            last = len(rows_list) - 1
            moved = self.searcher.delete([i])
            if [int(x) for x in moved] != [last]:
                raise RuntimeError(f"ScaNN delete moved {moved}, expected [{last}]")
            if i != last:
                rows_list[i] = rows_list[last]
                pos_of[rows_list[i]] = i
            rows_list.pop()
        self.rows = np.asarray(rows_list, np.int64)

    def serialize(self, directory: Path) -> dict:
        """Writes ScaNN's assets (relative paths) and rows.npy into an empty `directory`;
        returns the manifest {file name: {'bytes', 'sha256'}}."""
        directory.mkdir(parents=True, exist_ok=False)
        self.searcher.serialize(str(directory), True)
        stray = directory / "scann_docids.pkl"
        if stray.exists():  # never expected from the pybind searcher; never kept
            stray.unlink()
        atomic_save_npy(directory / "rows.npy", self.rows)
        return {p.name: file_record(p) for p in sorted(directory.iterdir()) if p.is_file()}

    @classmethod
    def load(cls, directory: Path, manifest: dict, params: ScannParams, dim: int) -> ScannIndex:
        """Loads from `directory` after checking every file against `manifest`."""
        _, pybind = _import_scann()
        if not directory.is_dir():
            raise IndexFileError(f"{directory}: missing ScaNN directory")
        for name, rec in manifest.items():
            check_file(directory / name, rec)
        for p in directory.iterdir():
            if p.suffix == ".pkl" or p.name not in manifest:
                raise IndexFileError(f"{p}: unexpected file in the ScaNN directory (not in the "
                                     "manifest; pickles are never loaded)")
        rows = load_npy(directory / "rows.npy", mmap=False).astype(np.int64)
        assets = (directory / "scann_assets.pbtxt").read_text()
        if "asset_path: \"/" in assets:
            raise IndexFileError(f"{directory / 'scann_assets.pbtxt'}: absolute asset paths; "
                                 "the index was not serialised with relative paths")
        try:
            searcher = pybind.ScannNumpy(str(directory), assets)
        except Exception as e:  # ScaNN reports bad assets as RuntimeError / status errors
            raise IndexFileError(f"{directory}: ScaNN could not load its assets: {e}") from e
        if searcher.size() != len(rows):
            raise IndexFileError(f"{directory / 'rows.npy'}: {len(rows)} rows but ScaNN holds "
                                 f"{searcher.size()} datapoints")
        return cls(searcher, rows, params, dim)


def replace_dir(src: Path, dst: Path) -> None:
    """Moves `src` to `dst`, removing an older `dst` afterwards."""
    if dst.exists():
        shutil.rmtree(dst)
    src.rename(dst)
