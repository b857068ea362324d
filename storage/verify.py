"""Verifying a run end to end, and marking damaged shards for recomputation.

What is checked (``shapcam verify RUN``):

- every chunk of every Zarr array is read: each carries a CRC-32C (Zarr v3's ``crc32c``
  codec), so a flipped byte fails to decode instead of reading as data;
- the folder is a run (a missing folder, an empty one or a folder of runs is an error, not a
  clean report), and a run that explained images still has its maps.zarr;
- every array of every table exists on disk, and the table's layout was written;
- every shard has its completion record (``shards/<dataset>/<model>/shard-XXXXX.json``),
  which parses and matches the CRC-32 of its content that it carries;
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
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from .errors import NotARunError, StorageError
from .location import Location
from .metrics_table import SHARD_FILE, fingerprint, shard_files, sources
from .names import glob_literal
from .saliency import SaliencyStore, check_record
from .tables import checksum_parts, file_checksum, invalidate

_METRICS = SHARD_FILE


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
    """Read the run at ``root`` end to end; see the module docstring. A folder that is not a
    run (missing, empty, a folder of runs) is a :class:`StorageError`, not a clean report."""
    store = SaliencyStore(root)
    loc = store.location
    _check_is_a_run(loc)
    report = Report()
    has_store = loc.exists("maps.zarr", "zarr.json")
    if not has_store and _is_explain_run(loc):
        report.problems.append(Problem(loc.path("maps.zarr"), MISSING_STORE))
    for dataset, model in store.tables() if has_store else []:  # training runs: none
        _check_table(report, store, dataset, model)
    completed_run = _completed(loc)
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
    report.problems += _stale_consolidated(loc)
    if completed_run and has_store:  # a finished run has every shard's metrics
        for dataset, model in store.tables():
            for k in range(_n_shards(store, dataset, model)):
                if (dataset, model, k) not in metrics_seen:
                    report.problems.append(Problem(
                        loc.path("metrics", f"dataset={dataset}", f"model={model}"),
                        f"no metrics file of shard {k}", dataset, model, k))
    return report


def _stale_consolidated(loc: Location) -> list[Problem]:
    """Consolidated metrics tables that are not made of the shard files the run has (a shard
    file changed by hand, or a writer that predates the invalidation)."""
    files = shard_files(loc)
    problems = []
    for path in loc.glob("metrics-*.parquet"):
        protocol = path.rsplit("/", 1)[-1].removeprefix("metrics-").removesuffix(".parquet")
        made_of = sources(loc, protocol)
        if made_of is not None and made_of[1] != fingerprint(files.get(protocol, {})):
            problems.append(Problem(path, f"stale: made from {made_of[0]} shard files, the run "
                                    f"has {len(files.get(protocol, {}))} (or they changed); "
                                    "--repair removes it and the resumed run rebuilds it"))
    return problems


MISSING_STORE = "missing: the run's maps (maps.zarr) are gone"
#: What a run folder holds; a folder with none of them is not a run.
_RUN_ENTRIES = ("maps.zarr", "manifest.parquet", "metrics", "training", "shards")


def _check_is_a_run(loc: Location) -> None:
    if not loc.isdir():
        raise StorageError(f"{loc.url} does not exist: pass a run folder written by "
                           "`shapcam run` (or a training command)")
    if any(loc.exists(e) for e in _RUN_ENTRIES):
        return
    runs = [d for d in loc.listdir() if any(loc.exists(d, e) for e in _RUN_ENTRIES)]
    if runs:
        raise NotARunError(f"{loc.url} is a folder of runs, not a run: verify one of them "
                           f"({', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''})", runs)
    raise StorageError(f"{loc.url} is not a run: it holds none of "
                       f"{', '.join(_RUN_ENTRIES)}")


def _is_explain_run(loc: Location) -> bool:
    """Whether the run explained images (its maps belong in maps.zarr)."""
    return loc.isdir("shards") or loc.isdir("metrics") or bool(loc.glob("images-*.parquet"))


def _completed(loc: Location) -> bool:
    if not loc.exists("manifest.parquet"):
        return False
    try:
        return all(s == "completed" for s in pq.read_table(
            loc.path("manifest.parquet"), filesystem=None if loc.local else loc.fs
        ).column("status").to_pylist())
    except Exception:  # noqa: BLE001 - reported by the Parquet pass
        return False


def _n_shards(store: SaliencyStore, dataset: str, model: str) -> int:
    try:
        return store.table(dataset, model)[0].n_shards
    except StorageError:  # an unfinished table: reported by _check_table
        return 0


def _check_table(report: Report, store: SaliencyStore, dataset: str, model: str) -> None:
    """Layout, expected arrays, every chunk, every completion record of one table."""
    loc = store.location
    where = f"{store.zarr_path}/{dataset}/{model}"
    try:
        spec, group = store.table(dataset, model)
    except StorageError as exc:
        report.problems.append(Problem(where, str(exc), dataset, model))
        return
    arrays = dict(_arrays(group))
    for name in expected_arrays(spec):  # on disk: the consolidated listing outlives a deletion
        if not loc.exists("maps.zarr", dataset, model, *name.split("/"), "zarr.json"):
            report.problems.append(Problem(f"{where}/{name}", "missing array", dataset, model))
            arrays.pop(name, None)
    for k, done in store.shard_status(dataset, model).items():
        marker = loc.path(*store._marker(dataset, model, k))
        if not done:
            report.problems.append(Problem(marker, "no completion record", dataset, model, k))
            continue
        try:
            check_record(loc.fs.cat_file(marker))
        except (OSError, StorageError) as exc:
            report.problems.append(Problem(marker, f"completion record: {exc}", dataset,
                                           model, k))
    for path, array in arrays.items():
        _check_chunks(report, store, dataset, model, spec.shard_size, path, array)


def expected_arrays(spec) -> list[str]:
    """Every array a table of ``spec`` holds (``images/...``, ``<method>/maps|raw|stderr``)."""
    names = [f"images/{a}" for a in ("image_id", "label", "target", "probability", "width",
                                     "height", "boxes")]
    for method in spec.raw_shapes:
        names += [f"{method}/raw"] + ([] if method in spec.derived else [f"{method}/maps"])
        names += [f"{method}/stderr"] if method in spec.stderr_methods else []
    return names


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
    if any(p.what == MISSING_STORE for p in report.problems):
        raise StorageError(f"{loc.path('maps.zarr')} is missing: no shard can be recomputed "
                           "into it; start a new run id")
    if any(p.dataset is not None and p.shard is None for p in report.problems):
        bad = next(p for p in report.problems if p.dataset is not None and p.shard is None)
        raise StorageError(f"{bad.path}: {bad.what}; this array indexes the whole table, so "
                           "no shard recomputes it: start a new run id")
    marked = []
    for (dataset, model), shards in report.shards().items():
        for k in shards:
            marker = loc.path(*store._marker(dataset, model, k))
            if loc.fresh().exists(marker):
                loc.fs.rm(marker)
            for path in loc.glob("metrics", glob_literal(f"dataset={dataset}"),
                                 glob_literal(f"model={model}"), "*",
                                 f"shard-{k:05d}-*.parquet"):
                loc.fs.rm(path)
            marked.append((dataset, model, k))
    if marked:  # the consolidated tables no longer match their sources: rebuilt on resume
        invalidate(loc)
    for p in report.problems:  # summaries, manifest, index: rewritten by every run
        if p.shard is None and loc.fresh().exists(p.path) and not loc.fs.isdir(p.path):
            loc.fs.rm(p.path)
    return marked
