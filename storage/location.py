"""Where a run lives: a local folder or any fsspec URL (``s3://bucket/runs/x``, ``memory://x``).

All storage I/O goes through :class:`Location`, so local paths and object stores behave alike.
Local writes are atomic by temporary file + rename; object stores write whole objects at once.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem


class Location:
    """A run root on some filesystem."""

    def __init__(self, root: str | os.PathLike[str], **storage_options: Any) -> None:
        self.url = os.fspath(root)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.storage_options = storage_options

    def path(self, *parts: str) -> str:
        """Filesystem-native path of ``parts`` below the root."""
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def url_of(self, *parts: str) -> str:
        """A URL (or local path) that other libraries (zarr, xarray) can open."""
        p = self.path(*parts)
        if self.local:
            return p
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{p.lstrip('/')}" if protocol != "memory" else f"memory://{p}"

    def fresh(self) -> AbstractFileSystem:
        """The filesystem with no remembered listing: a run changes while it is read (shards
        land, the consolidated table is replaced), and s3fs/gcsfs keep every listing they made
        for the life of the process (a dashboard would never see a new shard)."""
        if not self.local:
            self.fs.invalidate_cache()
        return self.fs

    def exists(self, *parts: str) -> bool:
        return self.fresh().exists(self.path(*parts))

    def isdir(self, *parts: str) -> bool:
        return self.fresh().isdir(self.path(*parts))

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def listdir(self, *parts: str) -> list[str]:
        """Names of the folders directly below ``parts``."""
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1]
                      for e in self.fresh().ls(self.path(*parts), detail=True)
                      if e.get("type") == "directory")

    def pattern(self, *parts: str) -> str:
        """A glob pattern of ``parts`` below the root, for fsspec and DuckDB. The root is
        never a pattern (a run folder named ``b?se`` does not read ``base``'s files); a name
        in ``parts`` that may hold glob characters comes through
        :func:`storage.names.glob_literal`."""
        root = glob.escape(self.root.rstrip("/"))
        return "/".join([root, *[p.strip("/") for p in parts if p]])

    def glob(self, *parts: str) -> list[str]:
        return sorted(self.fresh().glob(self.pattern(*parts)))

    def read_text(self, *parts: str) -> str:
        return self.fs.cat_file(self.path(*parts)).decode()

    def mtime(self, *parts: str) -> float | None:
        info = self.fresh().info(self.path(*parts))
        return info.get("mtime") or info.get("LastModified") or info.get("created")

    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Write ``data`` atomically: temp file + rename locally, one object put elsewhere;
        returns where (a local path or a URL)."""
        target = self.path(*parts)
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self.local:
            tmp = f"{target}.tmp{os.getpid()}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, target)
            except BaseException:  # a full disk, a stop: no half-written file left behind
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:
            self.fs.pipe_file(target, data)
        return self.url_of(*parts)  # s3://bucket/... rather than bucket/...
