"""Atomic file writes shared by every room: readers never see a half-written file, and a
failure leaves the previous file (or nothing) in place. And the sha256 manifests that
checkpoints, bundles and indexes are verified against.

Files get the permissions a plain `open()` would give (0666 less the umask), not the
owner-only mode of `tempfile.mkstemp`, so indexes, bundles and reports stay readable by the
other users of a shared cluster filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp_path)` for a temporary file beside `path`, then renames it onto
    `path`. The temporary file is removed if `write` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path, obj, indent: int = 2, sort_keys: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path, error: type[Exception], missing: str, what: str = "file"):
    """The parsed JSON file at `path`. Every failure raises `error` with a message that names
    the file: `{path}: {missing}` when it is absent, and the line and column of bad JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}:{e.colno}: corrupted {what}: invalid JSON: {e.msg}"
                    ) from e
    except UnicodeDecodeError as e:
        raise error(f"{path}: corrupted {what}: not UTF-8 text") from e


def replace_dir(src, dst) -> None:
    """Moves the finished directory `src` (made with `tempfile.mkdtemp` beside `dst`) to `dst`,
    replacing what was there only once `src` is complete, with umask permissions."""
    src, dst = Path(src), Path(dst)
    os.chmod(src, 0o777 & ~_umask())
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """{'bytes', 'sha256'} of a file, as stored in manifests."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def file_manifest(directory, *exclude: str) -> dict[str, dict]:
    """{relative path: file_record} of every file under `directory`, except the top-level
    names in `exclude` (the manifest itself)."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): file_record(p)
            for p in sorted(directory.rglob("*"))
            if p.is_file() and p.relative_to(directory).parts[0] not in exclude}


def manifest_problem(directory, manifest: dict[str, dict], *exclude: str) -> str | None:
    """None when the files under `directory` are exactly `manifest` (from `file_manifest`),
    else the first difference in words, naming the file."""
    directory = Path(directory)
    for rel, rec in manifest.items():
        f = directory / rel
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != rec["bytes"]:
            return f"{f}: {size} bytes, its manifest says {rec['bytes']} (truncated or replaced)"
        if sha256_file(f) != rec["sha256"]:
            return f"{f}: sha256 differs from its manifest (the file was changed or corrupted)"
    extra = sorted(set(file_manifest(directory, *exclude)) - set(manifest))
    if extra:
        return f"{directory / extra[0]}: not in its manifest (a file was added)"
    return None
