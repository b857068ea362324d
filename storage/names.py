"""Run ids, checked once before any path is built from them.

A run id names a folder of the store and appears in Prefect's flow-run names, markdown and
artifact keys, so it is a plain name: 1 to 100 characters of ASCII letters, digits, ``.``,
``_`` and ``-``, starting with a letter or a digit. That rules out path separators, ``.`` and
``..``, glob characters (``* ? [ ]``), markup (backticks, ``<``, ``>``, ``|``), spaces and
non-ASCII letters, whose spelling differs between filesystems.
"""

from __future__ import annotations

import glob
import re

from .errors import StorageError

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RUN_ID_RULE = ("1-100 ASCII letters, digits, '.', '_' or '-', starting with a letter or a "
               "digit (e.g. 2026-12-03-ilsvrc)")


def check_run_id(run_id: str) -> str:
    """``run_id`` when it is a valid run id, else a :class:`StorageError` saying what is."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise StorageError(f"invalid run id {run_id!r}: use {RUN_ID_RULE}")
    return run_id


def glob_literal(part: str) -> str:
    """``part`` as a glob pattern that matches only itself (``b?se`` matches no ``base``)."""
    return glob.escape(part)
