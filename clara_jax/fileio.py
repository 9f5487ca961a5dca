"""Atomic file writes shared by every room: readers never see a half-written file, and a
failure leaves the previous file (or nothing) in place. And the sha256 manifests that
checkpoints, bundles and indexes are verified against.

Files get the permissions a plain `open()` would give (0666 less the umask), not the
owner-only mode of `tempfile.mkstemp`, so indexes, bundles and reports stay readable by the
other users of a shared cluster filesystem.

Paths may also be URLs of the filesystems `etils.epath` reaches (`gs://bucket/run`, s3://,
az://): `as_path` gives an `epath.Path` for those and a plain `pathlib.Path` otherwise, so a
URL is never read as a local relative directory (`./gs:/bucket/run`). On object storage a
file is written whole in one upload: the store publishes an object only when its upload
completes, which is what the temporary name and rename give on a local disk (a "rename"
there is a copy and a delete, so it is not used).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def is_url(path) -> bool:
    """Whether `path` names a file on another filesystem (`scheme://...`)."""
    return "://" in os.fspath(path)


def as_path(path):
    """`path` as an `etils.epath.Path` when it is a URL (gs://, s3://, az://), else as a
    `pathlib.Path`. ValueError naming the path for a scheme epath does not know."""
    if not is_url(path):
        return Path(path)
    # Lazy: fileio is in every command's --help path, and only URL workdirs need epath.
    from etils import epath

    try:
        return epath.Path(os.fspath(path))
    except KeyError:  # epath's registry of URL schemes
        raise ValueError(f"{os.fspath(path)}: unsupported URL scheme (use a local path, gs://, "
                         "s3:// or az://)") from None


def absolute(path):
    """`path` made absolute; a URL is already (pathlib would put the working directory before
    `gs:`)."""
    return as_path(path) if is_url(path) else Path(path).absolute()


def atomic_write(path, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp_path)` for a temporary file beside `path`, then renames it onto
    `path`. The temporary file is removed if `write` fails. For a URL the temporary file is
    local and is then uploaded whole (see the module docstring)."""
    if is_url(path):
        _upload_whole(as_path(path), write)
        return
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


def _upload_whole(path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        data = Path(tmp).read_bytes()  # all of it first: a failed write uploads nothing
    finally:
        Path(tmp).unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path, obj, indent: int = 2, sort_keys: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path, error: type[Exception], missing: str, what: str = "file"):
    """The parsed JSON file at `path`. Every failure raises `error` with a message that names
    the file: `{path}: {missing}` when it is absent, and the line and column of bad JSON."""
    path = as_path(path)
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


def _digest(path, bufsize: int = 1 << 22) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with as_path(path).open("rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def sha256_file(path, bufsize: int = 1 << 22) -> str:
    return _digest(path, bufsize)[0]


def file_size(path) -> int:
    """Bytes in the file (epath's stat has no st_size)."""
    return Path(path).stat().st_size if not is_url(path) else as_path(path).stat().length


def file_record(path) -> dict:
    """{'bytes', 'sha256'} of a file, as stored in manifests."""
    sha, n = _digest(path)
    return {"bytes": n, "sha256": sha}


def files_under(directory) -> Iterator[str]:
    """The relative POSIX paths of the files under `directory`, sorted. (epath's walk gives
    fsspec's protocol-less names for a URL, so the tree is listed with iterdir.)"""
    directory = as_path(directory)
    if not is_url(directory):
        yield from (p.relative_to(directory).as_posix() for p in sorted(directory.rglob("*"))
                    if p.is_file())
        return
    pending = [("", directory)]
    found = []
    while pending:
        rel, d = pending.pop()
        for p in d.iterdir():
            r = f"{rel}{p.name}"
            if p.is_dir():
                pending.append((r + "/", p))
            else:
                found.append(r)
    yield from sorted(found)


def file_manifest(directory, *exclude: str) -> dict[str, dict]:
    """{relative path: file_record} of every file under `directory`, except the top-level
    names in `exclude` (the manifest itself)."""
    directory = as_path(directory)
    return {rel: file_record(directory / rel) for rel in files_under(directory)
            if rel.split("/")[0] not in exclude}


def manifest_problem(directory, manifest: dict[str, dict], *exclude: str) -> str | None:
    """None when the files under `directory` are exactly `manifest` (from `file_manifest`),
    else the first difference in words, naming the file."""
    directory = as_path(directory)
    for rel, rec in manifest.items():
        f = directory / rel
        if not f.is_file():
            return f"{f}: missing"
        size = file_size(f)
        if size != rec["bytes"]:
            return f"{f}: {size} bytes, its manifest says {rec['bytes']} (truncated or replaced)"
        if sha256_file(f) != rec["sha256"]:
            return f"{f}: sha256 differs from its manifest (the file was changed or corrupted)"
    extra = sorted(set(file_manifest(directory, *exclude)) - set(manifest))
    if extra:
        return f"{directory / extra[0]}: not in its manifest (a file was added)"
    return None


def check_format(meta: dict, where, fmt: str, version: int, error=ValueError) -> None:
    """Raises `error` naming `where` unless meta's 'format' is `fmt` and its 'format_version'
    is `version` (a file another tool, or another version of this one, wrote)."""
    if meta.get("format") != fmt:
        raise error(f"{where}: field 'format' is {meta.get('format')!r}, expected {fmt!r}")
    if meta.get("format_version") != version:
        raise error(f"{where}: field 'format_version' is {meta.get('format_version')!r}, "
                    f"this code reads {version}")
