"""One writer per directory: an advisory lock file that names its holder.

`clara train` holds WORKDIR/.clara.lock for the whole run, `clara data build|world` hold
OUT/.clara.lock and `clara index build|add|delete` INDEX/.clara.lock while they write, and
`clara export` holds PARENT/.NAME.clara.lock beside the bundle it replaces, so a second writer
into the same directory stops at once with one line naming the first (its PID, host and
command) instead of interleaving checkpoints, metrics or index generations. The lock is
`fcntl.flock` on that file: the kernel releases it when its process dies, however it dies, so
a killed run never holds a directory forever. The file itself stays (removing it while
another process waits on it would let two writers in).

On object storage (a `gs://` workdir) there is no file lock: nothing on the store knows
whether the process that wrote a file still runs. There the lock is a lease instead: the
holder writes its record with a heartbeat counter into the same file and rewrites it every
`LEASE_BEAT_S`; another writer that finds the file watches the counter for `LEASE_S` and
stops with the same one line when it moves (its holder lives), or takes the lease over with
a warning when it does not (its holder was killed). Only the counter's movement is compared,
never clocks, so the hosts' clocks need not agree. The file is removed when the holder
finishes. Two writers that start within the same moment can still both pass (a store
without conditional writes through epath cannot settle that), so the lease guards against
the common mistake, a second run started into a live workdir, not a deliberate race.

`clean_stale_builds` removes the `.clara_<name>.building-PID` directories that a killed
`clara data build` leaves behind (their PID no longer runs).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from clara_jax.fileio import as_path, atomic_write_json, is_url

LOCK_FILE = ".clara.lock"
# The lease on object storage: a heartbeat every LEASE_BEAT_S; a record whose heartbeat has
# not moved for LEASE_S is a killed holder's.
LEASE_BEAT_S = 10.0
LEASE_S = 30.0


class LockError(RuntimeError):
    """Another live process writes into the directory; the message names it."""


@contextlib.contextmanager
def lock(directory, what: str):
    """Holds DIRECTORY/.clara.lock (creating the directory) while the block runs; LockError
    when another process holds it (for a URL: a lease, see the module docstring)."""
    if is_url(directory):
        directory = as_path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with _lease(directory / LOCK_FILE, directory, what) as path:
            yield path
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _flock(directory / LOCK_FILE, directory, what) as path:
        yield path


@contextlib.contextmanager
def lock_output(out, what: str):
    """The same for an output that is replaced whole (a bundle written to a temporary
    directory, then renamed over OUT): the lock is the sibling file PARENT/.NAME.clara.lock,
    which the rename cannot remove."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _flock(out.parent / f".{out.name}{LOCK_FILE}", out, what) as path:
        yield path


@contextlib.contextmanager
def _flock(path: Path, directory: Path, what: str):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            raise LockError(f"{directory}: in use by {holder} (one writer per directory: wait "
                            f"for it to finish, or use another directory)") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
                  "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock


def _holder(path: Path) -> str:
    try:
        r = json.loads(path.read_text())
        return f"{r['command']} (PID {r['pid']} on {r['host']}, since {r['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _read_lease(path) -> dict | None:
    try:
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # cut off or foreign: no heartbeat to watch
        return {}


@contextlib.contextmanager
def _lease(path, directory, what: str):
    found = _read_lease(path)
    if found is not None:
        # Live holders move their heartbeat within LEASE_BEAT_S; watch it for LEASE_S.
        deadline = time.monotonic() + LEASE_S
        while time.monotonic() < deadline:
            time.sleep(min(LEASE_BEAT_S / 4, 1.0))
            now = _read_lease(path)
            if now is None:
                break  # released meanwhile
            if now.get("token") != found.get("token") or now.get("beat") != found.get("beat"):
                raise LockError(f"{directory}: in use by {_holder(path)} (one writer per "
                                "directory: wait for it to finish, or use another directory)")
        else:
            print(f"warning: {directory}: taking over the lease of {_holder(path)}, whose "
                  f"heartbeat stopped {LEASE_S:.0f}s or more ago (the run was killed)",
                  file=sys.stderr, flush=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
              "since": datetime.datetime.now().isoformat(timespec="seconds"),
              "token": uuid.uuid4().hex, "beat": 0}
    atomic_write_json(path, record)
    stop = threading.Event()

    def beat():
        warned = False
        while not stop.wait(LEASE_BEAT_S):
            record["beat"] += 1
            try:
                atomic_write_json(path, record)
            except OSError as e:  # the store is unreachable for now: keep trying
                if not warned:
                    print(f"warning: {path}: cannot renew the workdir lease ({e})",
                          file=sys.stderr, flush=True)
                    warned = True

    thread = threading.Thread(target=beat, name="clara-lease", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError):
            if (_read_lease(path) or {}).get("token") == record["token"]:
                path.unlink()


_BUILDING = re.compile(r"^\.clara_\w+\.(building|old)-(\d+)$")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_builds(directory) -> list[str]:
    """Removes DIRECTORY/.clara_<name>.building-PID (and .old-PID) directories whose PID is not
    running, saying so on stderr; returns their names."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in sorted(directory.iterdir()):
        m = _BUILDING.match(p.name)
        if m and p.is_dir() and not _running(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    if removed:
        print(f"removed {len(removed)} unfinished build director"
              f"{'y' if len(removed) == 1 else 'ies'} of killed runs in {directory}: "
              f"{', '.join(removed)}", file=sys.stderr)
    return removed
