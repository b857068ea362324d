"""Storage errors: every failure names the path and what would work."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


class StorageError(RuntimeError):
    """A store or table cannot be written or read as asked."""


class SchemaVersionError(StorageError):
    """The store was written with another schema version."""


class IncompleteShardError(StorageError):
    """The shard's writer never finished it."""


class NotARunError(StorageError):
    """The folder holds runs, not one run; ``runs`` are their folder names."""

    def __init__(self, message: str, runs: list[str]) -> None:
        super().__init__(message)
        self.runs = runs


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn OS errors (full disk, permissions, ...) into :class:`StorageError` naming ``path``.

    What was written before the error stays readable: shards are only marked complete after
    all their chunks are written.
    """
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            hint = "the disk is full: free space or point the run at another folder"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "no permission to write there: choose a writable folder"
        else:
            hint = exc.strerror or str(exc)
        raise StorageError(f"cannot write {path}: {hint} ({exc}). Completed shards remain "
                           "readable; re-run the same run id to resume") from exc
