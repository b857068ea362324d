"""One writer per run: a lock file in the run folder, naming its owner, kept fresh by a
heartbeat, taken over when its owner is gone.

``run_lock(root)`` creates ``<root>/.lock`` exclusively (``O_CREAT | O_EXCL`` locally; on an
object store, create-if-absent where the filesystem offers it, else check-then-write) holding
``{"host", "pid", "started", "heartbeat"}``; a thread rewrites ``heartbeat`` every
:data:`HEARTBEAT` seconds. Another process finding the file gets a :class:`RunLockedError`
naming the owner. A lock is stale, and taken over, when its owner's process is gone (same
host) or its heartbeat is older than :data:`STALE_AFTER` seconds (any host: a killed machine).
The same process may take the lock again (the CLI holds it around ``--repair`` and the flow).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from .errors import StorageError
from .location import Location

HEARTBEAT = 15.0
STALE_AFTER = 120.0
_HELD: dict[str, int] = {}  # lock path -> depth, in this process
_GUARD = threading.Lock()


class RunLockedError(StorageError):
    """Another process is writing this run."""


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _stale(info: dict[str, Any], now: float) -> bool:
    if now - float(info.get("heartbeat", 0)) > STALE_AFTER:
        return True
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
    return False


def _create(loc: Location, data: bytes) -> bool:
    """Create the lock file if absent; whether this call created it."""
    path = loc.path(".lock")
    if loc.local:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True
    try:
        with loc.fs.open(path, "xb") as fh:  # create-if-absent where supported
            fh.write(data)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # mode "x" unsupported: best effort
        if loc.fresh().exists(path):
            return False
        loc.fs.pipe_file(path, data)
        return True


def _read(loc: Location) -> dict[str, Any]:
    try:
        info = json.loads(loc.fs.cat_file(loc.path(".lock")))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}  # half-written or gone: no owner to protect


def acquire(loc: Location) -> None:
    now = time.time()
    data = json.dumps({**_owner(), "started": now, "heartbeat": now}).encode()
    for _ in range(3):
        if _create(loc, data):
            return
        info = _read(loc)
        if info.get("host") == socket.gethostname() and info.get("pid") == os.getpid():
            return  # this process's own lock (another thread or a nested use)
        if not (info == {} or _stale(info, time.time())):
            seen = time.time() - float(info.get("heartbeat", 0))
            raise RunLockedError(
                f"run {loc.url} is being written by another process (pid {info.get('pid')} "
                f"on {info.get('host')}, last seen {seen:.0f} s ago): wait for it to end or "
                f"stop it; a lock whose owner is gone, or silent for {STALE_AFTER:.0f} s, is "
                "taken over")
        with contextlib.suppress(OSError):
            loc.fs.rm(loc.path(".lock"))  # stale: take it over
    raise RunLockedError(f"run {loc.url}: could not take its lock (another process keeps "
                         "taking it); try again")


@contextlib.contextmanager
def run_lock(root: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the run's lock for the block (re-entrant within a process)."""
    loc = Location(root)
    key = loc.path(".lock")
    with _GUARD:
        depth = _HELD.get(key, 0)
        if not depth:
            loc.makedirs()
            acquire(loc)
        _HELD[key] = depth + 1
    stop = threading.Event()
    beat = None
    if not depth:
        beat = threading.Thread(target=_beat, args=(loc, stop), name="run-lock", daemon=True)
        beat.start()
    try:
        yield
    finally:
        with _GUARD:
            _HELD[key] -= 1
            last = not _HELD[key]
            if last:
                del _HELD[key]
        if beat is not None:
            stop.set()
            beat.join()
        if last:
            with contextlib.suppress(OSError):
                if _read(loc).get("pid") == os.getpid():
                    loc.fs.rm(key)


def _beat(loc: Location, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT):
        info = _read(loc)
        if info.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                loc.write_bytes(json.dumps({**info, "heartbeat": time.time()}).encode(),
                                ".lock")
