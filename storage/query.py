"""Reading a run back: lazy maps, metrics as DataFrames, SQL with DuckDB.

    import storage
    run = storage.open_run("runs/2026-11-26")
    run.tables()                                             # [("sample", "mobilenet_v2")]
    maps = run.maps("sample", "mobilenet_v2", "shapcam")     # lazy xarray (image, y, x)
    tabby = run.maps("sample", "mobilenet_v2", "shapcam", labels=[281]).load()
    df = run.metrics(filters=[("method", "=", "shapcam"), ("avg_drop", ">", 50)])
    run.sql("select method, avg(avg_drop) from metrics group by method")
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from .errors import IncompleteShardError, NotARunError, StorageError
from .location import Location
from .metrics_table import metrics_dataset, shard_files
from .saliency import SaliencyStore
from .sandbox import RESULT_BYTES, Sandbox

#: Photos opened for pages and reports: refused over this many pixels (before decoding),
#: drawn at most this many pixels a side.
PHOTO_MAX_PIXELS = 100_000_000
PHOTO_MAX_SIDE = 1024


class Run:
    """A finished or running run folder (``maps.zarr``, ``metrics/``, ``manifest.parquet``)."""

    def __init__(self, root: str | os.PathLike[str], **storage_options: Any) -> None:
        self.location = Location(root, **storage_options)
        self.root = self.location.url
        if not self.location.isdir():
            raise StorageError(f"run folder {self.root} does not exist")
        if not any(self.location.exists(part) for part in _RUN_PARTS):
            runs = run_folders(self.location)
            if runs:
                shown = ", ".join(runs[:8]) + (f" and {len(runs) - 8} more" if len(runs) > 8
                                               else "")
                raise NotARunError(f"{self.root} is a folder of runs, not a run: pass one of "
                                   f"them, e.g. {self.location.url_of(runs[0])} (runs: "
                                   f"{shown})", runs)
        self.store = SaliencyStore(self.root, **storage_options)

    # -- maps ----------------------------------------------------------------------------
    def tables(self) -> list[tuple[str, str]]:
        return self.store.tables()

    def images(self, dataset: str, model: str, slot: int = 0) -> pd.DataFrame:
        """The image table (id, label, target, probability, size) with a ``complete`` flag.

        With a class axis (runs with ``--target topk:K`` or ``present``) ``target`` and
        ``probability`` are those of class position ``slot`` (-1 / NaN where an image has
        fewer classes), and ``targets`` lists every class of the image.
        """
        spec, g = self.store.table(dataset, model)
        img = g["images"]
        df = pd.DataFrame({k: img[k][:] for k in ("image_id", "label", "width", "height")})
        target, prob = img["target"][:], img["probability"][:]
        _check_slot(dataset, model, slot, target.shape[1] if target.ndim == 2 else 1)
        if target.ndim == 2:
            df["targets"] = [[int(c) for c in row if c >= 0] for row in target]
            target, prob = target[:, slot], prob[:, slot]
        df.insert(2, "target", target)
        df.insert(3, "probability", prob)
        status = self.store.shard_status(dataset, model)
        df["shard"] = np.arange(spec.n_images) // spec.shard_size
        df["complete"] = df["shard"].map(status)
        return df

    def maps(self, dataset: str, model: str, method: str, *, ids: Sequence[str] | None = None,
             labels: Sequence[int] | None = None, variable: str = "maps",
             allow_incomplete: bool = False, images: pd.DataFrame | None = None,
             slot: int | None = None):
        """Lazy ``xarray.DataArray`` (image, y, x) with image ids as coordinate.

        Selecting by ``ids`` or ``labels`` keeps the dask graph to the chunks of those images
        only. Images of incomplete shards raise :class:`IncompleteShardError` unless
        ``allow_incomplete`` (they would read as NaN fill values). ``images``: this table's
        :meth:`images` already read (several maps of one page read it once). With a class
        axis the array is (image, class, y, x) with a ``target`` coordinate (image, class),
        the explained class of each map (-1: none); ``slot`` selects one class position.
        """
        import xarray as xr

        if images is None:
            images = self.images(dataset, model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = xr.open_zarr(self.store.zarr_path, group=f"{dataset}/{model}/{method}",
                              consolidated=False)
        spec, g = self.store.table(dataset, model)
        derived = variable == "maps" and method in spec.derived
        if not derived and variable not in ds:
            raise StorageError(f"{dataset}/{model}/{method} has no {variable!r} "
                               f"(it has {', '.join(ds.data_vars)})")
        da = ds["raw" if derived else variable].assign_coords(
            image=images["image_id"].to_numpy(), label=("image", images["label"].to_numpy()))
        if slot is not None:
            _check_slot(dataset, model, slot, da.sizes.get("class", 1))
        if "class" in da.dims:
            da = da.assign_coords(target=(("image", "class"), g["images"]["target"][:]))
            if slot is not None:
                da = da.isel({"class": slot})
        keep = np.ones(len(images), dtype=bool)
        if ids is not None:
            wanted = set(ids)
            missing = wanted - set(images["image_id"])
            if missing:
                raise StorageError(f"unknown image ids {sorted(missing)[:5]}")
            keep &= images["image_id"].isin(wanted).to_numpy()
        if labels is not None:
            keep &= images["label"].isin(list(labels)).to_numpy()
        selected = images[keep]
        if not allow_incomplete and not selected["complete"].all():
            shards = sorted(selected.loc[~selected["complete"], "shard"].unique().tolist())
            raise IncompleteShardError(f"{dataset}/{model}: shards {shards} are incomplete; "
                                       "resume the run or pass allow_incomplete=True")
        da = da.isel(image=np.flatnonzero(keep))
        # derived maps: from the selected raw maps only (one image computes one map)
        return _derived_maps(da, spec.map_shape) if derived else da

    def image_index(self, dataset: str) -> pd.DataFrame:
        """Path, classes and boxes (original pixels) of each image (``images-<dataset>``)."""
        import pyarrow.parquet as pq

        name = f"images-{dataset}.parquet"
        if not self.location.exists(name):
            raise StorageError(f"{self.root} has no {name} (runs made before the image index "
                               "existed do not; re-run `shapcam run` with the same --run-id "
                               "to add it)")
        fs = None if self.location.local else self.location.fs
        return pq.read_table(self.location.path(name), filesystem=fs).to_pandas()

    def photo(self, dataset: str, image_id: str, size: tuple[int, int] | None = None,
              max_side: int = PHOTO_MAX_SIDE, index: pd.DataFrame | None = None
              ) -> np.ndarray:
        """The RGB photo of ``image_id`` as uint8 ``(h, w, 3)``, resized to ``size`` (w, h):
        the frame of the stored maps when ``size`` is the map size; else shrunk to at most
        ``max_side`` pixels a side (reports and pages draw it, never at a camera's full
        resolution). A photo over :data:`PHOTO_MAX_PIXELS` is refused before decoding.
        ``index``: :meth:`image_index` already read (many photos)."""
        from PIL import Image

        index = self.image_index(dataset) if index is None else index
        row = index[index["image_id"] == image_id]
        if row.empty:
            raise StorageError(f"image {image_id!r} is not in {dataset} of {self.root}")
        path = row["path"].iloc[0]
        try:
            with Image.open(_photo_source(path)) as im:
                if im.width * im.height > PHOTO_MAX_PIXELS:
                    raise StorageError(f"the photo of {image_id} ({path}) has {im.width} x "
                                       f"{im.height} pixels, over the budget of "
                                       f"{PHOTO_MAX_PIXELS:,}")
                target = size or _shrunk(im.size, max_side)
                im.draft("RGB", target)  # JPEG: decode at a fraction of the size when it can
                im = im.convert("RGB")
                if im.size != target:
                    im = im.resize(target, Image.BILINEAR)
                return np.asarray(im)
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read the photo of {image_id}: {path}: {exc}") from exc

    # -- tables ----------------------------------------------------------------------------
    def _metrics_dataset(self) -> pads.Dataset:
        if not self.location.isdir("metrics"):
            raise StorageError(f"{self.root} has no metrics yet (no metrics/ folder)")
        return metrics_dataset(self.location)

    def metrics(self, filters: Sequence[tuple[str, str, Any]] | None = None,
                columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Per-image metric rows; ``filters`` like ``[("method", "=", "shapcam")]`` are pushed
        down to the Parquet scan (partition pruning and row-group statistics)."""
        expr = None
        for col, op, value in filters or []:
            f = pads.field(col)
            term = {"=": f == value, "==": f == value, "!=": f != value, ">": f > value,
                    ">=": f >= value, "<": f < value, "<=": f <= value,
                    "in": f.isin(list(value)) if op == "in" else None}.get(op)
            if term is None:
                raise StorageError(f"unknown filter operator {op!r}; use = != > >= < <= in")
            expr = term if expr is None else expr & term
        try:
            table = self._metrics_dataset().to_table(
                filter=expr, columns=list(columns) if columns else None)
        except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
            reason = str(exc).strip().splitlines()[0].split(". ")[0][:300]
            raise StorageError(f"a metrics file of {self.root} is damaged ({reason}): "
                               "`shapcam verify` names it, `shapcam run --run-id ID --repair` "
                               "recomputes its shard") from None
        return table.to_pandas()

    def query_metrics(self, query: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """A trusted query of this package's own code (not a user's: :meth:`sql` is for those)
        over the view ``metrics``, scanned from the consolidated table where it is current
        (projection and filters pushed down to Parquet, nothing copied)."""
        import duckdb

        con = duckdb.connect(":memory:")
        try:
            con.execute("set memory_limit = '1GB'")
            con.register("metrics", self._metrics_dataset())
            return con.execute(query, list(params)).df()
        except (OSError, ValueError, duckdb.Error) as exc:
            raise StorageError(f"cannot read the metrics of {self.root} "
                               f"({str(exc).strip().splitlines()[0][:200]}): `shapcam verify` "
                               "checks the run") from None
        finally:
            con.close()

    def training(self) -> pd.DataFrame:
        """Per-epoch rows of a training run (``config`` column = configuration name)."""
        if not self.location.isdir("training"):
            raise StorageError(f"{self.root} has no training/ tables")
        part = pads.partitioning(pa_schema_config(), flavor="hive")
        fs = None if self.location.local else self.location.fs
        ds = pads.dataset(self.location.path("training"), format="parquet", partitioning=part,
                          filesystem=fs, exclude_invalid_files=True)
        return ds.to_table().to_pandas().sort_values(["config", "epoch"]).reset_index(drop=True)

    def manifest(self) -> pd.DataFrame | None:
        """The run manifest (one row per dataset x model), read directly; None before the
        run's end wrote it."""
        if not self.location.exists("manifest.parquet"):
            return None
        return self._read_small("manifest.parquet").to_pandas()

    def summary(self, protocol: str | None = None) -> pd.DataFrame:
        """The run summary rows (``summary-<protocol>.parquet``; every protocol: None)."""
        import pyarrow as pa

        from .tables import SUMMARY_SCHEMA

        names = ([f"summary-{protocol}.parquet"] if protocol else
                 [p.rsplit("/", 1)[-1] for p in self.location.glob("summary-*.parquet")])
        tables = [self._read_small(n) for n in names if self.location.exists(n)]
        if not tables:
            return SUMMARY_SCHEMA.empty_table().to_pandas()
        return pa.concat_tables(tables).to_pandas()

    def _read_small(self, name: str):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(self.location.path(name),
                                 filesystem=None if self.location.local else self.location.fs)
        except (OSError, ValueError) as exc:
            raise StorageError(f"{self.location.path(name)} is damaged "
                               f"({str(exc).splitlines()[0][:200]}): `shapcam verify` "
                               "checks the run") from None

    def version(self) -> str:
        """Changes whenever the run's tables do (a cache key for readers such as the
        dashboard): names, sizes and times of its top-level tables and the number of shard
        metrics files."""
        import hashlib

        parts = [f"{len(files)}:{protocol}" for protocol, files in
                 sorted(shard_files(self.location, sizes=False).items())]
        for path in self.location.glob("*.parquet"):
            info = self.location.fresh().info(path)
            stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag")
            parts.append(f"{path}:{info.get('size')}:{stamp}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def sql(self, query: str, *, max_rows: int | None = None, max_bytes: int = RESULT_BYTES,
            timeout: float | None = None) -> pd.DataFrame:
        """Run one read-only SQL statement (DuckDB dialect) over the run's tables, in a sandbox.

        The tables ``metrics``, ``manifest``, ``summary`` and ``training`` (those the run has)
        are copied into an in-memory database (within its 1 GB memory limit, set first; the
        metrics come from the consolidated table, :mod:`storage.metrics_table`); then DuckDB's
        own settings shut everything else: no file or URL access (``read_csv``, ``glob``,
        ``COPY``, ``ATTACH`` of a file, ``EXPORT``), no extension installed or loaded, no
        spilling to disk, and the configuration locked (``SET``, ``RESET`` and setting
        ``PRAGMA`` s fail). Only one ``SELECT`` or ``EXPLAIN`` runs. Refusals are
        :class:`StorageError` with DuckDB's one-line reason. The result stops at ``max_rows``
        rows and ``max_bytes`` bytes (the frame's ``attrs["truncated"]`` says whether more
        existed); ``timeout`` (seconds) and Ctrl-C interrupt a long query
        (:mod:`storage.sandbox`). Many queries: :meth:`sandbox` once, then its ``query``.
        """
        box = self.sandbox()
        try:
            return box.query(query, max_rows=max_rows, max_bytes=max_bytes, timeout=timeout)
        finally:
            box.close()

    def sandbox(self) -> Sandbox:
        """The run's tables copied into one locked-down DuckDB (:class:`storage.sandbox.Sandbox`)
        that serves many queries; close it when done."""
        return Sandbox(self._sql_tables(), str(self.root))

    def _sql_tables(self) -> dict[str, Any]:
        import pyarrow as pa

        tables: dict[str, Any] = {}
        if self.location.isdir("metrics"):
            try:
                tables["metrics"] = self._metrics_dataset().to_table()
            except (OSError, ValueError) as exc:
                raise StorageError(f"cannot read the metrics of {self.root}: "
                                   f"{str(exc).splitlines()[0][:200]}") from None
        if self.location.exists("manifest.parquet"):
            tables["manifest"] = self._read_small("manifest.parquet")
        if self.location.glob("summary-*.parquet"):
            tables["summary"] = pa.Table.from_pandas(self.summary(), preserve_index=False)
        if self.location.isdir("training"):
            tables["training"] = pa.Table.from_pandas(self.training(), preserve_index=False)
        return tables


def _derived_maps(raw, size: tuple[int, int]):
    """The maps of a method that stores only its raw map, computed chunk by chunk on read
    (lazy, like the stored ones: selecting images computes their chunks only)."""
    import xarray as xr

    from .derive import maps_from_raw

    data = raw.data.map_blocks(maps_from_raw, size, dtype=np.float16,
                               chunks=(*raw.data.chunks[:-2], (size[0],), (size[1],)))
    lead = set(raw.dims[:-2])
    coords = {k: v for k, v in raw.coords.items() if set(v.dims) <= lead}
    return xr.DataArray(data, dims=(*raw.dims[:-2], "y", "x"), coords=coords, name="maps")


def _check_slot(dataset: str, model: str, slot: int, n: int) -> None:
    """``slot`` must be a class position of the table (0 .. n - 1; only 0 without class axis)."""
    if n == 1 and slot != 0:
        raise StorageError(f"{dataset}/{model} has one class per image; slot must be 0")
    if not 0 <= slot < n:
        raise StorageError(f"slot {slot} does not exist: {dataset}/{model} has classes "
                           f"0..{n - 1} per image")


def pa_schema_config():
    import pyarrow as pa

    return pa.schema([("config", pa.string())])


#: What a run folder holds (a training run has no maps).
_RUN_PARTS = ("maps.zarr", "metrics", "manifest.parquet", "training")


def _shrunk(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def run_folders(root: str | os.PathLike[str] | Location) -> list[str]:
    """Names of the run folders directly under ``root`` (a ``--store`` folder), sorted."""
    loc = root if isinstance(root, Location) else Location(root)
    return sorted(name for name in loc.listdir()
                  if any(loc.exists(name, part) for part in _RUN_PARTS))


def open_run(root: str | os.PathLike[str]) -> Run:
    """Open a run folder for reading (see the module docstring for examples)."""
    return Run(root)


#: Bytes read for a photo behind a URL, at most.
PHOTO_MAX_BYTES = 256 * 2**20


def _photo_source(path: str) -> Any:
    """A local path as is; an fsspec URL (images in a bucket) read into memory, bounded."""
    if "://" not in str(path):
        return path
    import io

    import fsspec

    try:
        with fsspec.open(path, "rb") as fh:
            data = fh.read(PHOTO_MAX_BYTES + 1)
    except Exception as exc:  # noqa: BLE001 - missing, no credentials, no backend, network
        raise OSError(f"{type(exc).__name__}: {exc}") from None
    if len(data) > PHOTO_MAX_BYTES:
        raise OSError(f"over {PHOTO_MAX_BYTES >> 20} MB")
    return io.BytesIO(data)
