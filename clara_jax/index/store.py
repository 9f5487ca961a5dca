"""On-disk latent store: chunked `.npy` files readable without loading the whole store.

Layout of one chunk `k` (rows `start .. start+count-1` of the store), under `<index>/store/`:

    chunk-{k:05d}.latents.npy   float32[n, M, L] | uint16[n, M, L] (bfloat16 bits) | int8[n, M, L]
    chunk-{k:05d}.scales.npy    float32[n, M]     (int8 only: one scale per latent vector)
    chunk-{k:05d}.docs.jsonl    one line per document {"id", "title", "text"} (audit only)
    chunk-{k:05d}.json          the chunk's record: ids, byte offsets into the jsonl, and the
                                size and sha256 of each file above; written last (atomically),
                                so a chunk exists only once all of its files are complete.

Arrays are memory-mapped (`np.load(mmap_mode='r')`); a chunk's checksums are verified the
first time it is read in a process, so a corrupted file is named when it is touched and a
truncated one (wrong size) when the index is opened.

int8 quantisation is symmetric per latent vector (one float32 scale per [doc, m]):
`scale = max|x| / 127`, `q = round(x / scale)`; the round-trip error of every element is at
most `scale / 2 = max|x| / 254` of its own vector (plus float32 rounding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from clara_jax import fileio
from clara_jax.fileio import atomic_write_bytes, file_record, sha256_file

DTYPES = ("float32", "bfloat16", "int8")
INT8_MAX = 127.0
# Elementwise int8 round-trip bound, as a fraction of the vector's max |x|.
INT8_REL_ERROR_BOUND = 1.0 / (2 * INT8_MAX)


class IndexFileError(ValueError):
    """A file of an index is missing, truncated, corrupted or malformed; the message names it."""


class IndexMismatchError(ValueError):
    """An index was opened with a model (or merged with a shard) that it does not belong to."""


# ----------------------------------------------------------------------------- file helpers

def atomic_write_json(path: Path, obj) -> None:
    fileio.atomic_write_json(path, obj, indent=1, sort_keys=True)


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: Path):
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    fileio.atomic_write(path, write)


def read_json(path: Path, what: str = "file") -> dict:
    """Parses a JSON file; errors name the file (and the line/column of bad JSON)."""
    return fileio.read_json(path, IndexFileError, f"missing {what}", what)


def require_field(obj: dict, key: str, path: Path, kind=None):
    if key not in obj:
        raise IndexFileError(f"{path}: field {key!r} is missing")
    if kind is not None and not isinstance(obj[key], kind):
        raise IndexFileError(f"{path}: field {key!r} has type {type(obj[key]).__name__}, "
                             f"expected {getattr(kind, '__name__', kind)}")
    return obj[key]


def check_size(path: Path, record: dict) -> None:
    """Missing or truncated file -> IndexFileError naming it."""
    if not path.is_file():
        raise IndexFileError(f"{path}: missing file (listed in the index manifest)")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise IndexFileError(f"{path}: truncated or overwritten: {size} bytes, the manifest "
                             f"says {record['bytes']}")


def check_file(path: Path, record: dict) -> None:
    """Size and sha256 against a manifest record -> IndexFileError naming the file."""
    check_size(path, record)
    digest = sha256_file(path)
    if digest != record["sha256"]:
        raise IndexFileError(f"{path}: corrupted: sha256 {digest[:16]}... does not match the "
                             f"manifest's {record['sha256'][:16]}...")


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """np.load without pickles; a malformed header is reported with the file's name."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise IndexFileError(f"{path}: unreadable .npy file: {e}") from e


# ----------------------------------------------------------------------------- quantisation

def quantize_int8(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """latents: float[..., L] -> (int8[..., L], scales float32[...]); one scale per vector."""
    x = np.asarray(latents, np.float32)
    amax = np.max(np.abs(x), axis=-1)
    scales = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scales[..., None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8[..., L], float32[...] -> float32[..., L]."""
    return np.asarray(q, np.float32) * np.asarray(scales, np.float32)[..., None]


def encode_latents(latents: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float[n, M, L] -> (stored array, scales float32[n, M] or None) in storage `dtype`."""
    x = np.asarray(latents, np.float32)
    if dtype == "float32":
        return x, None
    if dtype == "bfloat16":
        # .npy has no bfloat16; the raw bits are stored as uint16 and viewed back on read.
        return x.astype(ml_dtypes.bfloat16).view(np.uint16), None
    if dtype == "int8":
        return quantize_int8(x)
    raise ValueError(f"latent dtype {dtype!r}: must be one of {DTYPES}")


def decode_latents(stored: np.ndarray, scales: np.ndarray | None, dtype: str) -> np.ndarray:
    """Inverse of `encode_latents` -> float32[n, M, L]."""
    if dtype == "float32":
        return np.asarray(stored, np.float32)
    if dtype == "bfloat16":
        return np.asarray(stored).view(ml_dtypes.bfloat16).astype(np.float32)
    if dtype == "int8":
        return dequantize_int8(stored, scales)
    raise ValueError(f"latent dtype {dtype!r}: must be one of {DTYPES}")


def bytes_per_doc(dtype: str, m: int, latent_width: int) -> int:
    """Bytes of latents (and scales) one document takes in the store."""
    n = m * latent_width
    return {"float32": 4 * n, "bfloat16": 2 * n, "int8": n + 4 * m}[dtype]


# ----------------------------------------------------------------------------- chunks

def chunk_name(k: int) -> str:
    return f"chunk-{k:05d}"


@dataclass
class Chunk:
    """One committed chunk: its record (the `chunk-k.json` contents) and where it lives."""
    k: int
    start: int
    count: int
    ids: list[str]
    offsets: list[int]
    files: dict[str, dict]
    record_path: Path

    @property
    def stop(self) -> int:
        return self.start + self.count


def write_chunk(store_dir: Path, k: int, start: int, latents: np.ndarray, ids: list[str],
                dtype: str, titles=None, texts=None) -> Path:
    """Writes chunk `k` (latents float[n, M, L], n ids, optional titles/texts for the audit
    store); the record file is written last. Returns the record's path."""
    n = latents.shape[0]
    if len(ids) != n:
        raise ValueError(f"chunk {k}: {n} latents but {len(ids)} ids")
    name = chunk_name(k)
    stored, scales = encode_latents(latents, dtype)
    paths = {"latents": store_dir / f"{name}.latents.npy"}
    atomic_save_npy(paths["latents"], stored)
    if scales is not None:
        paths["scales"] = store_dir / f"{name}.scales.npy"
        atomic_save_npy(paths["scales"], scales)
    lines, offsets, pos = [], [], 0
    for i, doc_id in enumerate(ids):
        rec = {"id": doc_id}
        if titles is not None and titles[i] is not None:
            rec["title"] = titles[i]
        if texts is not None and texts[i] is not None:
            rec["text"] = texts[i]
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
        offsets.append(pos)
        pos += len(line)
        lines.append(line)
    offsets.append(pos)
    paths["docs"] = store_dir / f"{name}.docs.jsonl"
    atomic_write_bytes(paths["docs"], b"".join(lines))
    record = {
        "chunk": k, "start": start, "count": n, "dtype": dtype,
        "shape": list(latents.shape), "ids": list(ids), "offsets": offsets,
        "files": {role: {"name": p.name, **file_record(p)} for role, p in paths.items()},
    }
    record_path = store_dir / f"{name}.json"
    atomic_write_json(record_path, record)
    return record_path


def load_chunk_record(record_path: Path, dtype: str, m: int, latent_width: int) -> Chunk:
    """Reads and checks a chunk record (sizes of its files, not yet their checksums)."""
    rec = read_json(record_path, "chunk record")
    k = require_field(rec, "chunk", record_path, int)
    start = require_field(rec, "start", record_path, int)
    count = require_field(rec, "count", record_path, int)
    ids = require_field(rec, "ids", record_path, list)
    offsets = require_field(rec, "offsets", record_path, list)
    files = require_field(rec, "files", record_path, dict)
    if rec.get("dtype") != dtype:
        raise IndexFileError(f"{record_path}: field 'dtype' is {rec.get('dtype')!r}, the index "
                             f"stores {dtype!r}")
    if rec.get("shape") != [count, m, latent_width]:
        raise IndexFileError(f"{record_path}: field 'shape' is {rec.get('shape')}, expected "
                             f"{[count, m, latent_width]}")
    if len(ids) != count or len(offsets) != count + 1:
        raise IndexFileError(f"{record_path}: {len(ids)} ids / {len(offsets)} offsets for "
                             f"count={count}")
    need = {"latents", "docs"} | ({"scales"} if dtype == "int8" else set())
    if set(files) != need:
        raise IndexFileError(f"{record_path}: field 'files' lists {sorted(files)}, expected "
                             f"{sorted(need)}")
    for frec in files.values():
        check_size(record_path.parent / frec["name"], frec)
    return Chunk(k, start, count, ids, offsets, files, record_path)


@dataclass
class LatentStore:
    """Read access to the committed chunks of an index's store (float32 out, any dtype in)."""
    store_dir: Path
    dtype: str
    m: int
    latent_width: int
    chunks: list[Chunk]
    _verified: set = field(default_factory=set)

    @property
    def num_rows(self) -> int:
        return self.chunks[-1].stop if self.chunks else 0

    def ids(self) -> list[str]:
        return [i for c in self.chunks for i in c.ids]

    def _path(self, chunk: Chunk, role: str) -> Path:
        return self.store_dir / chunk.files[role]["name"]

    def _verify(self, chunk: Chunk, role: str) -> None:
        key = (chunk.k, role)
        if key not in self._verified:
            check_file(self._path(chunk, role), chunk.files[role])
            self._verified.add(key)

    def _arrays(self, chunk: Chunk):
        self._verify(chunk, "latents")
        stored = load_npy(self._path(chunk, "latents"))
        want = (chunk.count, self.m, self.latent_width)
        if stored.shape != want:
            raise IndexFileError(f"{self._path(chunk, 'latents')}: shape {stored.shape}, the "
                                 f"chunk record says {want}")
        scales = None
        if self.dtype == "int8":
            self._verify(chunk, "scales")
            scales = load_npy(self._path(chunk, "scales"))
            if scales.shape != want[:2]:
                raise IndexFileError(f"{self._path(chunk, 'scales')}: shape {scales.shape}, "
                                     f"expected {want[:2]}")
        return stored, scales

    def read_chunk(self, chunk: Chunk, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows [lo, hi) of one chunk (chunk-relative) -> float32[hi - lo, M, L]."""
        stored, scales = self._arrays(chunk)
        hi = chunk.count if hi is None else hi
        return decode_latents(stored[lo:hi], None if scales is None else scales[lo:hi],
                              self.dtype)

    def read_rows(self, rows) -> np.ndarray:
        """Store rows (any order) -> float32[len(rows), M, L]; touches only their chunks."""
        rows = np.asarray(rows, np.int64)
        out = np.zeros((len(rows), self.m, self.latent_width), np.float32)
        starts = np.array([c.start for c in self.chunks], np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        for ci in np.unique(which):
            chunk = self.chunks[ci]
            sel = np.nonzero(which == ci)[0]
            stored, scales = self._arrays(chunk)
            local = rows[sel] - chunk.start
            out[sel] = decode_latents(stored[local], None if scales is None else scales[local],
                                      self.dtype)
        return out

    def iter_blocks(self, block_rows: int = 65536):
        """Yields (start_row, float32[n, M, L]) over the whole store, chunk by chunk."""
        for chunk in self.chunks:
            for lo in range(0, chunk.count, block_rows):
                hi = min(lo + block_rows, chunk.count)
                yield chunk.start + lo, self.read_chunk(chunk, lo, hi)

    def doc(self, row: int) -> dict:
        """The audit record {'id', 'title'?, 'text'?} of a store row."""
        starts = [c.start for c in self.chunks]
        ci = int(np.searchsorted(starts, row, side="right") - 1)
        chunk = self.chunks[ci]
        self._verify(chunk, "docs")
        i = row - chunk.start
        path = self._path(chunk, "docs")
        with open(path, "rb") as f:
            f.seek(chunk.offsets[i])
            line = f.read(chunk.offsets[i + 1] - chunk.offsets[i])
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise IndexFileError(f"{path}:{i + 1}: corrupted audit record: {e.msg}") from e
