"""Verifying a run end to end, and marking damaged shards for recomputation.

What is checked (``shapcam verify RUN``):

- every chunk of every Zarr array is read: each carries a CRC-32C (Zarr v3's ``crc32c``
  codec), so a flipped byte fails to decode instead of reading as data;
- every shard has its completion record (``shards/<dataset>/<model>/shard-XXXXX.json``);
- every Parquet file matches its checksum record (``checksums/<same path>.json``: size and
  CRC-32, written after the file) and parses; a file without a record is damage too (its writer
  stopped between the two), and a completed run must have every shard's metrics.

Each problem names the file and the shard to recompute. :func:`mark_for_repair` removes what a
damaged shard left (its completion record, its metrics files), so resuming the run
(``shapcam run --repair``) recomputes exactly those shards.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from .errors import StorageError
from .location import Location
from .names import glob_literal
from .saliency import SaliencyStore
from .tables import checksum_parts, file_checksum

_METRICS = re.compile(r"metrics/dataset=(?P<dataset>[^/]+)/model=(?P<model>[^/]+)/"
                      r"method=(?P<method>[^/]+)/shard-(?P<shard>\d+)-(?P<protocol>[^/]+)"
                      r"\.parquet$")


@dataclass(frozen=True)
class Problem:
    """One damaged or missing piece: where, what, and the shard that recomputes it (None: not
    shard data, e.g. the run summary, rewritten at the end of every run)."""

    path: str
    what: str
    dataset: str | None = None
    model: str | None = None
    shard: int | None = None


@dataclass
class Report:
    chunks: int = 0
    parquet_files: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def shards(self) -> dict[tuple[str, str], list[int]]:
        """Damaged shards per ``(dataset, model)``."""
        out: dict[tuple[str, str], set[int]] = {}
        for p in self.problems:
            if p.dataset is not None and p.model is not None and p.shard is not None:
                out.setdefault((p.dataset, p.model), set()).add(p.shard)
        return {k: sorted(v) for k, v in sorted(out.items())}


def verify_run(root: str | os.PathLike[str]) -> Report:
    """Read the run at ``root`` end to end; see the module docstring."""
    store = SaliencyStore(root)
    loc = store.location
    report = Report()
    completed_run = False
    tables = store.tables() if loc.exists("maps.zarr", "zarr.json") else []  # training runs
    for dataset, model in tables:
        spec, group = store.table(dataset, model)
        status = store.shard_status(dataset, model)
        for k, done in status.items():
            if not done:
                report.problems.append(Problem(
                    loc.path(*store._marker(dataset, model, k)), "no completion record",
                    dataset, model, k))
        for path, array in _arrays(group):
            _check_chunks(report, store, dataset, model, spec.shard_size, path, array)
    if loc.exists("manifest.parquet"):
        try:
            completed_run = all(s == "completed" for s in pq.read_table(
                loc.path("manifest.parquet"), filesystem=None if loc.local else loc.fs
            ).column("status").to_pylist())
        except Exception:  # noqa: BLE001 - reported by the Parquet pass below
            completed_run = False
    metrics_seen: set[tuple[str, str, int]] = set()
    for path in loc.glob("**", "*.parquet"):
        rel = path[len(loc.path()):].lstrip("/")
        if rel.startswith("checksums/"):
            continue
        report.parquet_files += 1
        m = _METRICS.search(rel)
        where = (m["dataset"], m["model"], int(m["shard"])) if m else (None, None, None)
        if m:
            metrics_seen.add(where)
        what = _check_parquet(loc, rel)
        if what:
            report.problems.append(Problem(path, what, *where))
    if completed_run:  # a finished run has every shard's metrics
        for dataset, model in tables:
            spec, _ = store.table(dataset, model)
            for k in range(spec.n_shards):
                if (dataset, model, k) not in metrics_seen:
                    report.problems.append(Problem(
                        loc.path("metrics", f"dataset={dataset}", f"model={model}"),
                        f"no metrics file of shard {k}", dataset, model, k))
    return report


def _arrays(group):
    """``(path, array)`` of every array below ``group``."""
    for name, member in group.members(max_depth=None):
        if hasattr(member, "shape"):
            yield name, member


def _check_chunks(report: Report, store: SaliencyStore, dataset: str, model: str,
                  shard_size: int, path: str, array) -> None:
    step = array.chunks[0]
    for start in range(0, array.shape[0], step):
        report.chunks += 1
        try:
            array[start:start + step]
        except Exception as exc:  # noqa: BLE001 - any decode failure is damage
            # a per-image chunk belongs to one shard; the one-chunk index arrays to all
            shard = start // shard_size if step == shard_size else None
            report.problems.append(Problem(
                f"{store.zarr_path}/{dataset}/{model}/{path}",
                f"chunk {start // step} unreadable: {str(exc).splitlines()[0][:120]}",
                dataset, model, shard))


def _check_parquet(loc: Location, rel: str) -> str | None:
    parts = tuple(rel.split("/"))
    try:
        data = loc.fs.cat_file(loc.path(*parts))
    except OSError as exc:
        return f"unreadable: {exc}"
    if loc.exists(*checksum_parts(*parts)):
        want = json.loads(loc.read_text(*checksum_parts(*parts)))
        got = file_checksum(data)
        if got != want:
            return (f"checksum mismatch: {got['bytes']} bytes, crc32 {got['crc32']}; recorded "
                    f"{want['bytes']} bytes, crc32 {want['crc32']}")
    elif loc.isdir("checksums"):  # written by a version that records checksums
        return "no checksum record (its writer stopped before finishing it)"
    try:
        import pyarrow as pa

        pq.read_table(pa.BufferReader(data))
    except Exception as exc:  # noqa: BLE001 - any parse failure is damage
        return f"not a readable Parquet file: {str(exc).splitlines()[0][:120]}"
    return None


def mark_for_repair(root: str | os.PathLike[str], report: Report) -> list[tuple[str, str, int]]:
    """Remove the completion records and metrics files of the damaged shards (and any damaged
    file that is not shard data), so resuming the run recomputes them; returns the shards."""
    store = SaliencyStore(root)
    loc = store.location
    if any(p.dataset is not None and p.shard is None for p in report.problems):
        bad = next(p for p in report.problems if p.dataset is not None and p.shard is None)
        raise StorageError(f"{bad.path}: {bad.what}; this array indexes the whole table, so "
                           "no shard recomputes it: start a new run id")
    marked = []
    for (dataset, model), shards in report.shards().items():
        for k in shards:
            marker = loc.path(*store._marker(dataset, model, k))
            if loc.fs.exists(marker):
                loc.fs.rm(marker)
            for path in loc.glob("metrics", glob_literal(f"dataset={dataset}"),
                                 glob_literal(f"model={model}"), "*",
                                 f"shard-{k:05d}-*.parquet"):
                loc.fs.rm(path)
            marked.append((dataset, model, k))
    for p in report.problems:  # summaries, manifest, index: rewritten by every run
        if p.shard is None and loc.fs.exists(p.path) and not loc.fs.isdir(p.path):
            loc.fs.rm(p.path)
    return marked
