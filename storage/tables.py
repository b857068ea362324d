"""Parquet tables of a run: per-image metrics, the run manifest, the run summary.

    <run>/metrics/dataset=<d>/model=<m>/method=<x>/shard-00003-<protocol>.parquet
    <run>/manifest.parquet
    <run>/summary-<protocol>.parquet
    <run>/images-<dataset>.parquet      (where each image is, its classes and boxes)
    <run>/training/config=<name>/epoch-00003.parquet   (training flows: one row per epoch)

One explicit pyarrow schema per table (a column written as int by one shard and float by
another would break readers). Every file is written to a temporary name and renamed, so a
reader never sees half a file and a killed writer leaves no partial file under its final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StorageError, storage_errors
from .location import Location

METRICS_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("shard", pa.int32()),
    ("image_id", pa.string()),
    ("target", pa.int32()),
    ("label", pa.int32()),
    ("protocol", pa.string()),
    ("y", pa.float64()),
    ("o", pa.float64()),
    ("avg_drop", pa.float64()),
    ("increase", pa.float64()),
    ("proportion", pa.float64()),
    ("pointing", pa.string()),  # pointing-game status: scored, no box, filtered, unannotated
    ("deletion", pa.float64()),
    ("insertion", pa.float64()),
    # field metrics (shapcam.evaluation.field_metrics): NULL unless the run asked for them
    ("sparseness", pa.float64()),
    ("complexity", pa.float64()),
    ("rank_accuracy", pa.float64()),
    ("mass_accuracy", pa.float64()),
    ("road_morf", pa.float64()),
    ("road_lerf", pa.float64()),
    ("mprt_spearman", pa.float64()),
    ("mprt_ssim", pa.float64()),
    ("seconds", pa.float64()),
    ("evaluations", pa.int64()),
    ("error", pa.string()),
])
PARTITIONS = ("dataset", "model", "method")

MANIFEST_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("config_hash", pa.string()),
    ("status", pa.string()),
    ("dataset", pa.string()),
    ("model", pa.string()),
    ("shards_total", pa.int32()),
    ("shards_done", pa.int32()),
    ("images", pa.int64()),
    ("failed_images", pa.int64()),
    ("started_at", pa.timestamp("s", tz="UTC")),
    ("finished_at", pa.timestamp("s", tz="UTC")),
    ("seconds", pa.float64()),
])

SUMMARY_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("dataset", pa.string()),
    ("model", pa.string()),
    ("method", pa.string()),
    ("protocol", pa.string()),
    ("metric", pa.string()),
    ("value", pa.float64()),
    ("images", pa.int64()),
])

BOX = pa.struct([("cls", pa.int32()), ("xmin", pa.float32()), ("ymin", pa.float32()),
                 ("xmax", pa.float32()), ("ymax", pa.float32())])
IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("label", pa.int32()),
    ("labels", pa.list_(pa.int32())),
    ("boxes", pa.list_(BOX)),  # original pixels, as in the annotation
    ("width", pa.int32()),  # from the annotation; null when it has none
    ("height", pa.int32()),
    ("error", pa.string()),
])

TRAINING_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("epoch", pa.int32()),
    ("lr", pa.float64()),
    ("train_loss", pa.float64()),
    ("train_ce", pa.float64()),
    ("train_interpret", pa.float64()),
    ("train_kd", pa.float64()),
    ("train_bce", pa.float64()),
    ("test_error", pa.float64()),  # %, classification
    ("test_loss", pa.float64()),
    ("test_map", pa.float64()),  # mean average precision, multi-label
    ("seconds", pa.float64()),
])


def _atomic_write(table: pa.Table, root: str | os.PathLike[str], *parts: str) -> str:
    """Write ``table`` under the run ``root`` (local path or fsspec URL), all or nothing, then
    its checksum record (:func:`checksum_parts`), which ``shapcam verify`` checks."""
    loc = Location(root)
    with storage_errors(loc.path(*parts)):
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue().to_pybytes()
        path = loc.write_bytes(data, *parts)
        loc.write_bytes(json.dumps(file_checksum(data)).encode(), *checksum_parts(*parts))
        return path


def file_checksum(data: bytes) -> dict[str, int]:
    """What a checksum record holds: the size and CRC-32 of a file's bytes."""
    return {"bytes": len(data), "crc32": zlib.crc32(data)}


def checksum_parts(*parts: str) -> tuple[str, ...]:
    """Where the checksum record of the file at ``parts`` lives (a mirror under
    ``checksums/``, outside the folders that readers scan)."""
    return ("checksums", *parts[:-1], parts[-1] + ".json")


def _table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema, what: str) -> pa.Table:
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise StorageError(f"{what} row has unknown columns {sorted(extra)}; the schema has "
                               f"{schema.names}")
    try:
        return pa.Table.from_pylist([dict(r) for r in rows], schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise StorageError(f"{what} rows do not fit the schema: {exc}") from exc


def metrics_parts(dataset: str, model: str, method: str, shard: int,
                  protocol: str = "scorecam") -> tuple[str, ...]:
    """One file per shard, method and protocol variant (variants never overwrite each other)."""
    return ("metrics", f"dataset={dataset}", f"model={model}", f"method={method}",
            f"shard-{shard:05d}-{protocol}.parquet")


def metrics_exist(root: str | os.PathLike[str], dataset: str, model: str, method: str,
                  shard: int, protocol: str = "scorecam") -> bool:
    return Location(root).exists(*metrics_parts(dataset, model, method, shard, protocol))


def write_metrics_shard(root: str | os.PathLike[str], dataset: str, model: str, method: str,
                        shard: int, rows: Sequence[Mapping[str, Any]],
                        protocol: str = "scorecam") -> str:
    """Write one shard's rows of one method and protocol (replaces that same file); the
    protocol's consolidated table no longer covers it and is removed first."""
    rows = [{**r, "shard": shard, "protocol": protocol} for r in rows]
    invalidate(Location(root), protocol)
    return _atomic_write(_table(rows, METRICS_SCHEMA, "metrics"), root,
                         *metrics_parts(dataset, model, method, shard, protocol))


def consolidated_name(protocol: str) -> str:
    """The run's consolidated metrics table of ``protocol`` (:mod:`storage.metrics_table`)."""
    return f"metrics-{protocol}.parquet"


def invalidate(loc: Location, protocol: str | None = None) -> None:
    """Remove the consolidated metrics table of ``protocol`` (every protocol: None) and its
    checksum record: done before a shard file changes, so that no consolidated table outlives
    one of its sources."""
    names = [consolidated_name(protocol)] if protocol else [
        p.rsplit("/", 1)[-1] for p in loc.glob("metrics-*.parquet")]
    for name in names:
        for parts in ((name,), checksum_parts(name)):
            path = loc.path(*parts)
            if loc.fresh().exists(path):
                with contextlib.suppress(FileNotFoundError):  # another writer was first
                    loc.fs.rm(path)


def write_manifest(root: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """Replace the run manifest (one row per dataset x model); written by the coordinator."""
    return _atomic_write(_table(rows, MANIFEST_SCHEMA, "manifest"), root, "manifest.parquet")


def write_summary(root: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]],
                  protocol: str = "scorecam") -> str:
    """The run's aggregate for one protocol variant: ``summary-<protocol>.parquet``."""
    return _atomic_write(_table(rows, SUMMARY_SCHEMA, "summary"), root,
                         f"summary-{protocol}.parquet")


def write_image_index(root: str | os.PathLike[str], dataset: str,
                      rows: Sequence[Mapping[str, Any]]) -> str:
    """Where each image of the run is, its classes and its boxes: what a viewer needs to show
    a map over its photo without the dataset reader (``images-<dataset>.parquet``)."""
    return _atomic_write(_table(rows, IMAGES_SCHEMA, "image index"), root,
                         f"images-{dataset}.parquet")


def write_training_epoch(root: str | os.PathLike[str], config: str, row: Mapping[str, Any]
                         ) -> str:
    """One epoch of one training configuration (``training/config=<name>/epoch-XXXXX``);
    rewriting an epoch (a resumed run) replaces it."""
    row = {k: v for k, v in row.items() if k in TRAINING_SCHEMA.names}
    return _atomic_write(_table([row], TRAINING_SCHEMA, "training"), root, "training",
                         f"config={config}", f"epoch-{int(row['epoch']):05d}.parquet")
