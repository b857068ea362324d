"""Running a user's SQL in the run's locked-down DuckDB, with bounded time, rows and bytes.

The query runs on a worker thread while the calling thread waits, so Ctrl-C (KeyboardInterrupt)
and the time limit interrupt DuckDB (``connection.interrupt()``) instead of waiting for it.
Results stream as Arrow batches and stop at ``max_rows`` rows or ``max_bytes`` bytes: a query
of wide values (``repeat('x', 1000000)``) or of many rows is cut where the budget ends, never
converted whole. DuckDB's own ``memory_limit`` bounds what it computes meanwhile.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pandas as pd

from .errors import StorageError

#: The tables a query sees (those the run has).
SQL_TABLES = ("metrics", "manifest", "summary", "training")
#: Bytes of a result kept (Arrow size) before it is cut (``attrs["truncated"]``).
RESULT_BYTES = 256 * 2**20
#: Rows per Arrow batch read from DuckDB (the unit of the byte budget).
_BATCH_ROWS = 64

#: Bounds set before the tables are copied in (the copy itself is within the memory limit).
LIMITS = (
    "set temp_directory = ''",  # never spill to disk
    "set secret_directory = ''",  # nor show where this machine's home is
    "set home_directory = ''",
    "set memory_limit = '1GB'",
    "set enable_progress_bar = false",
)
#: Then everything else is shut; the lock comes last.
LOCK = (
    "set enable_external_access = false",  # files, URLs, COPY, ATTACH of files, EXPORT
    "set autoinstall_known_extensions = false",
    "set autoload_known_extensions = false",
    "set allow_community_extensions = false",
    "set lock_configuration = true",  # SET / RESET / PRAGMA settings refused from here on
)
SANDBOX = LIMITS + LOCK
#: The statements a query may be (one of them): reading only, so one sandbox serves many
#: queries (the dashboard keeps one per run) and no query changes what the next one sees.
READ_ONLY = ("SELECT", "EXPLAIN")


class Sandbox:
    """One locked-down in-memory DuckDB holding copies of a run's tables, for many read-only
    queries: each runs on its own cursor (:func:`run_query`), so queries from several threads
    (a dashboard's sessions) do not wait for each other."""

    def __init__(self, tables: dict[str, Any], where: str) -> None:
        import duckdb

        self.where = where
        self._con = duckdb.connect(":memory:")
        try:
            for setting in LIMITS:
                self._con.execute(setting)
            for name, table in tables.items():
                self._con.register(f"_{name}_arrow", table)
                self._con.execute(f"create table {name} as select * from _{name}_arrow")
                self._con.unregister(f"_{name}_arrow")
            for setting in LOCK:
                self._con.execute(setting)
        except duckdb.Error as exc:
            self._con.close()
            raise _refusal(exc, where) from exc

    def query(self, query: str, *, max_rows: int | None = None, max_bytes: int = RESULT_BYTES,
              timeout: float | None = None) -> pd.DataFrame:
        """One read-only statement (``SELECT`` or ``EXPLAIN``); see :func:`run_query`."""
        import duckdb

        try:
            kinds = [s.type.name for s in self._con.extract_statements(query)]
        except duckdb.Error as exc:
            raise _refusal(exc, self.where) from exc
        if len(kinds) != 1 or kinds[0] not in READ_ONLY:
            got = ", ".join(kinds) or "nothing"
            raise StorageError(f"query refused on {self.where}: one read-only statement "
                               f"(SELECT, EXPLAIN) is run, got {got}")
        return run_query(self._con.cursor(), query, self.where, max_rows=max_rows,
                         max_bytes=max_bytes, timeout=timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._con.close()


def run_query(con: Any, query: str, where: str, *, max_rows: int | None = None,
              max_bytes: int = RESULT_BYTES, timeout: float | None = None) -> pd.DataFrame:
    """``query`` on ``con`` (closed afterwards) as a frame of at most ``max_rows`` rows and
    ``max_bytes`` bytes (``attrs["truncated"]`` says whether more existed); ``where`` names
    the run in errors. A query running past ``timeout`` seconds, or interrupted by Ctrl-C, is
    stopped inside DuckDB."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["df"] = _fetch(con, query, max_rows, max_bytes)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            # without its frames: they hold the query's result, which keeps the connection
            # busy (it would refuse to close)
            box["error"] = exc.with_traceback(None)

    worker = threading.Thread(target=work, name="sql", daemon=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.05)
            if deadline is not None and time.monotonic() > deadline and worker.is_alive():
                con.interrupt()
                worker.join()
                raise StorageError(f"query stopped after {timeout:g} s on {where}")
    except KeyboardInterrupt:
        con.interrupt()
        worker.join(10)
        raise
    finally:
        if not worker.is_alive():
            with contextlib.suppress(Exception):  # in memory: dropped with the object anyway
                con.close()
    if "error" in box:
        raise _refusal(box["error"], where) from box["error"]
    return box["df"]


def _fetch(con: Any, query: str, max_rows: int | None, max_bytes: int) -> pd.DataFrame:

    rel = con.sql(query)
    if rel is None:  # a statement without a result (CREATE, ...): in memory only
        return pd.DataFrame()
    if max_rows is not None:  # DuckDB stops after one row more than is kept
        rel = rel.limit(max_rows + 1)
    with contextlib.closing(rel.to_arrow_reader(_BATCH_ROWS)) as reader:
        return _read(reader, max_rows, max_bytes)


def _read(reader: Any, max_rows: int | None, max_bytes: int) -> pd.DataFrame:
    import pyarrow as pa

    batches, rows, size, truncated = [], 0, 0, False
    for batch in reader:
        if max_rows is not None and rows + batch.num_rows > max_rows:
            batch, truncated = batch.slice(0, max_rows - rows), True
        if size + batch.nbytes > max_bytes:
            batch, truncated = _fit(batch, max_bytes - size), True
        batches.append(batch)
        rows, size = rows + batch.num_rows, size + batch.nbytes
        if truncated:
            break
    df = pa.Table.from_batches(batches, schema=reader.schema).to_pandas()
    df.attrs["truncated"] = truncated
    return df


def _fit(batch: Any, budget: int) -> Any:
    """The longest head of ``batch`` within ``budget`` bytes (values cut nowhere)."""
    lo, hi = 0, batch.num_rows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if batch.slice(0, mid).nbytes <= budget:
            lo = mid
        else:
            hi = mid - 1
    return batch.slice(0, lo)


def _refusal(exc: BaseException, where: str) -> BaseException:
    import duckdb

    if isinstance(exc, StorageError) or not isinstance(exc, duckdb.Error):
        return exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, duckdb.InterruptException):
        return StorageError(f"query interrupted on {where}")
    if isinstance(exc, duckdb.PermissionException) or "has been locked" in first:
        return StorageError(f"query refused on {where}: {first} (queries see only the run's "
                            f"tables: {', '.join(SQL_TABLES)})")
    if isinstance(exc, duckdb.OutOfMemoryException):
        return StorageError(f"query failed on {where}: it needs more than the sandbox's "
                            "memory (1 GB): select fewer or narrower columns, or aggregate")
    return StorageError(f"query failed on {where}: {first}")
