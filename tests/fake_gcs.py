"""A Google Cloud Storage stand-in on this machine, for the gs:// workdir tests: every `gs://`
path of a run goes to it by the routes a real bucket is reached by, none of them shortened
into a local path by clara_jax.

- orbax's arrays (tensorstore's `gcs` driver) and orbax's bucket look-ups
  (google-cloud-storage) speak the GCS JSON API over HTTP; `FakeGcs` serves the part of it
  they use (objects: read with ranges and generation preconditions, upload, delete, list;
  bucket metadata) from ROOT/<bucket>/<object name>, and they are pointed at it through
  their documented endpoint settings ($TENSORSTORE_GCS_HTTP_URL, $STORAGE_EMULATOR_HOST).
- everything that goes through `etils.epath` (clara's files, orbax's metadata and commit
  markers) reaches fsspec's `gs`/`gcs` protocol, which `serve` points at a local-backed
  filesystem over the same ROOT (gcsfs, the real one, would go to the network).

Both views are one directory tree, so a test can check what landed in the "bucket".
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import tempfile
import threading
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem


def _generation(path: Path) -> int:
    return path.stat().st_mtime_ns


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as libcurl expects
    root: Path
    lock: threading.Lock

    def log_message(self, *args):  # quiet: pytest shows a failing test's output anyway
        pass

    def _reply(self, code: int, body: bytes = b"", headers: dict | None = None,
               content_type: str = "application/json") -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj) -> None:
        self._reply(code, json.dumps(obj).encode())

    def _error(self, code: int, message: str) -> None:
        self._json(code, {"error": {"code": code, "message": message}})

    def _route(self):
        """(bucket, object name or None, query, whether it lists the objects) of
        /storage/v1/b/B[/o[/NAME]] or /upload/storage/v1/b/B/o; bucket None for anything
        else."""
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        parts = url.path.split("/")[1:]  # storage v1 b BUCKET [o [NAME]], or upload ...
        if parts[:1] == ["upload"]:
            parts = parts[1:]
        if parts[:3] != ["storage", "v1", "b"] or len(parts) < 4:
            return None, None, query, False
        bucket = unquote(parts[3])
        listing = len(parts) == 5 and parts[4] == "o"
        # NAME arrives percent-encoded (a/b is a%2Fb), so it is one segment
        name = unquote("/".join(parts[5:])) if len(parts) > 5 and parts[4] == "o" else None
        return bucket, name, query, listing

    def _meta(self, bucket: str, name: str, path: Path) -> dict:
        return {"kind": "storage#object", "bucket": bucket, "name": name,
                "size": str(path.stat().st_size), "generation": str(_generation(path)),
                "metageneration": "1"}

    def _precondition(self, path: Path, query: dict) -> bool:
        gen = _generation(path) if path.is_file() else 0
        if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != gen:
            return False
        return True

    def do_GET(self):  # noqa: N802 (http.server's naming)
        bucket, name, query, listing = self._route()
        if bucket is None:
            return self._error(404, f"no route {self.path}")
        base = self.root / bucket
        if name is None and not listing:
            return self._json(200, {"kind": "storage#bucket", "name": bucket, "id": bucket,
                                    "hierarchicalNamespace": {"enabled": False}})
        if listing:
            return self._list(bucket, base, query)
        path = base / name
        with self.lock:
            if not path.is_file():
                return self._error(404, f"no object {name}")
            gen = _generation(path)
            if not self._precondition(path, query):
                return self._error(412, "precondition failed")
            if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == gen:
                return self._reply(304, headers={"x-goog-generation": str(gen)})
            if query.get("alt") != "media":
                return self._json(200, self._meta(bucket, name, path))
            data = path.read_bytes()
        headers = {"x-goog-generation": str(gen), "x-goog-metageneration": "1"}
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[len("bytes="):].partition("-")
            size = len(data)
            start = int(first) if first else max(size - int(last), 0)
            end = min(int(last), size - 1) if first and last else size - 1
            if start >= size and size:
                return self._reply(416, headers={"Content-Range": f"bytes */{size}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return self._reply(206, data[start:end + 1], headers, "application/octet-stream")
        return self._reply(200, data, headers, "application/octet-stream")

    def _list(self, bucket: str, base: Path, query: dict) -> None:
        prefix = query.get("prefix", "")
        start, end = query.get("startOffset", ""), query.get("endOffset")
        names = sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                       if p.is_file()) if base.is_dir() else []
        names = [n for n in names if n.startswith(prefix) and n >= start
                 and (end is None or n < end)]
        items, prefixes = [], set()
        delimiter = query.get("delimiter")
        for n in names:
            rest = n[len(prefix):]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter)[0] + delimiter)
            else:
                items.append(self._meta(bucket, n, base / n))
        out = {"kind": "storage#objects", "items": items}
        if prefixes:
            out["prefixes"] = sorted(prefixes)
        self._json(200, out)

    def do_POST(self):  # noqa: N802
        bucket, _, query, listing = self._route()
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if bucket is None or not listing or query.get("uploadType") != "media":
            return self._error(400, f"unsupported upload {self.path}")
        name = query["name"]
        path = self.root / bucket / name
        with self.lock:
            if not self._precondition(path, query):
                return self._error(412, "precondition failed")
            old = _generation(path) if path.is_file() else 0
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fake_gcs.")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # an object appears whole, as in GCS
            if _generation(path) <= old:  # a rewrite within the clock's tick: a new generation
                os.utime(path, ns=(old + 1, old + 1))
            meta = self._meta(bucket, name, path)
        self._json(200, meta)

    def do_DELETE(self):  # noqa: N802
        bucket, name, query, _ = self._route()
        if bucket is None or name is None:
            return self._error(400, f"unsupported delete {self.path}")
        path = self.root / bucket / name
        with self.lock:
            if not path.is_file():
                return self._error(404, f"no object {name}")
            if not self._precondition(path, query):
                return self._error(412, "precondition failed")
            path.unlink()
        self._reply(204)


class _LocalBackedGcs(LocalFileSystem):
    """fsspec's local filesystem with `gs://bucket/x` (or `bucket/x`, as fsspec passes paths
    on) mapped under `root`. Subclassed per fake, since fsspec resolves paths in class
    methods."""

    protocol = ("gs", "gcs")
    root = ""

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for p in ("gs://", "gcs://"):
            if path.startswith(p):
                path = path[len(p):]
        if path.startswith(cls.root + "/") or path == cls.root:
            return path.rstrip("/")
        return f"{cls.root}/{path.lstrip('/')}".rstrip("/")

    def _name(self, local: str) -> str:
        """`bucket/x` for ROOT/bucket/x: names as gcsfs gives them (etils puts gs:// before
        the names glob returns)."""
        return local[len(self.root) + 1:] if local.startswith(self.root + "/") else local

    def glob(self, path, **kwargs):
        return [self._name(p) for p in super().glob(path, **kwargs)]

    def walk(self, path, *args, **kwargs):
        for root, dirs, files in super().walk(path, *args, **kwargs):
            yield self._name(root), dirs, files


@contextlib.contextmanager
def serve(root: Path):
    """Serves `root` as GCS for the block: gs://B/NAME is ROOT/B/NAME for tensorstore,
    google-cloud-storage and fsspec (so etils.epath). Restores the settings afterwards."""
    from etils.epath import backend as epath_backend
    from orbax.checkpoint._src.path import gcs_utils

    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    handler = type("Handler", (_Handler,), {"root": root, "lock": threading.Lock()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    env = {"TENSORSTORE_GCS_HTTP_URL": url, "STORAGE_EMULATOR_HOST": url,
           # tensorstore's documented test credential: no metadata server, no key file
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs_cls = type("FakeGcsFileSystem", (_LocalBackedGcs,), {"root": str(root)})
    from fsspec.registry import _registry as registry  # what register_implementation edits
    saved_impl = {p: registry.get(p) for p in ("gs", "gcs")}
    for p in ("gs", "gcs"):
        fsspec.register_implementation(p, fs_cls, clobber=True)

    def clear_caches():  # epath and orbax keep the filesystem and bucket handles they made
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
        gcs_utils.get_bucket.cache_clear()

    clear_caches()
    try:
        yield root
    finally:
        server.shutdown()
        server.server_close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for p, impl in saved_impl.items():
            if impl is None:
                registry.pop(p, None)
            else:
                registry[p] = impl
        clear_caches()
