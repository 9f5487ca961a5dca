"""One writer per directory: an advisory lock file that names its holder.

`clara train` holds WORKDIR/.clara.lock for the whole run, `clara data build|world` hold
OUT/.clara.lock and `clara index build|add|delete` INDEX/.clara.lock while they write, and
`clara export` holds PARENT/.NAME.clara.lock beside the bundle it replaces, so a second writer
into the same directory stops at once with one line naming the first (its PID, host and
command) instead of interleaving checkpoints, metrics or index generations. The lock is
`fcntl.flock` on that file: the kernel releases it when its process dies, however it dies, so
a killed run never holds a directory forever. The file itself stays (removing it while
another process waits on it would let two writers in).

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
from pathlib import Path

LOCK_FILE = ".clara.lock"


class LockError(RuntimeError):
    """Another live process writes into the directory; the message names it."""


@contextlib.contextmanager
def lock(directory, what: str):
    """Holds DIRECTORY/.clara.lock (creating the directory) while the block runs; LockError
    when another process holds it."""
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
