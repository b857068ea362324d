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

from .errors import IncompleteShardError, StorageError
from .location import Location
from .saliency import SaliencyStore
from .tables import METRICS_SCHEMA, PARTITIONS


class Run:
    """A finished or running run folder (``maps.zarr``, ``metrics/``, ``manifest.parquet``)."""

    def __init__(self, root: str | os.PathLike[str], **storage_options: Any) -> None:
        self.location = Location(root, **storage_options)
        self.root = self.location.url
        if not self.location.isdir():
            raise StorageError(f"run folder {self.root} does not exist")
        self.store = SaliencyStore(self.root, **storage_options)

    # -- maps ----------------------------------------------------------------------------
    def tables(self) -> list[tuple[str, str]]:
        return self.store.tables()

    def images(self, dataset: str, model: str) -> pd.DataFrame:
        """The image table (id, label, target, probability, size) with a ``complete`` flag."""
        spec, g = self.store.table(dataset, model)
        img = g["images"]
        df = pd.DataFrame({k: img[k][:] for k in ("image_id", "label", "target", "probability",
                                                   "width", "height")})
        status = self.store.shard_status(dataset, model)
        df["shard"] = np.arange(spec.n_images) // spec.shard_size
        df["complete"] = df["shard"].map(status)
        return df

    def maps(self, dataset: str, model: str, method: str, *, ids: Sequence[str] | None = None,
             labels: Sequence[int] | None = None, variable: str = "maps",
             allow_incomplete: bool = False, images: pd.DataFrame | None = None):
        """Lazy ``xarray.DataArray`` (image, y, x) with image ids as coordinate.

        Selecting by ``ids`` or ``labels`` keeps the dask graph to the chunks of those images
        only. Images of incomplete shards raise :class:`IncompleteShardError` unless
        ``allow_incomplete`` (they would read as NaN fill values). ``images``: this table's
        :meth:`images` already read (several maps of one page read it once).
        """
        import xarray as xr

        if images is None:
            images = self.images(dataset, model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = xr.open_zarr(self.store.zarr_path, group=f"{dataset}/{model}/{method}",
                              consolidated=False)
        if variable not in ds:
            raise StorageError(f"{dataset}/{model}/{method} has no {variable!r} "
                               f"(it has {', '.join(ds.data_vars)})")
        da = ds[variable].assign_coords(image=images["image_id"].to_numpy(),
                                        label=("image", images["label"].to_numpy()))
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
        return da.isel(image=np.flatnonzero(keep))

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

    def photo(self, dataset: str, image_id: str, size: tuple[int, int] | None = None
              ) -> np.ndarray:
        """The RGB photo of ``image_id`` as uint8 ``(h, w, 3)``, resized to ``size`` (w, h):
        the frame of the stored maps when ``size`` is the map size."""
        from PIL import Image

        index = self.image_index(dataset)
        row = index[index["image_id"] == image_id]
        if row.empty:
            raise StorageError(f"image {image_id!r} is not in {dataset} of {self.root}")
        path = row["path"].iloc[0]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if size is not None:
                    im = im.resize(size, Image.BILINEAR)
                return np.asarray(im)
        except OSError as exc:
            raise StorageError(f"cannot read the photo of {image_id}: {path}: {exc}") from exc

    # -- tables --------------------------------------------------------------------------
    def _metrics_dataset(self) -> pads.Dataset:
        if not self.location.isdir("metrics"):
            raise StorageError(f"{self.root} has no metrics yet (no metrics/ folder)")
        part = pads.partitioning(_partition_schema(), flavor="hive")
        fs = None if self.location.local else self.location.fs
        return pads.dataset(self.location.path("metrics"), format="parquet", partitioning=part,
                            schema=_full_schema(), filesystem=fs, exclude_invalid_files=True)

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
        table = self._metrics_dataset().to_table(filter=expr, columns=list(columns) if columns
                                                 else None)
        return table.to_pandas()

    def training(self) -> pd.DataFrame:
        """Per-epoch rows of a training run (``config`` column = configuration name)."""
        if not self.location.isdir("training"):
            raise StorageError(f"{self.root} has no training/ tables")
        part = pads.partitioning(pa_schema_config(), flavor="hive")
        fs = None if self.location.local else self.location.fs
        ds = pads.dataset(self.location.path("training"), format="parquet", partitioning=part,
                          filesystem=fs, exclude_invalid_files=True)
        return ds.to_table().to_pandas().sort_values(["config", "epoch"]).reset_index(drop=True)

    def sql(self, query: str) -> pd.DataFrame:
        """Run SQL with DuckDB over the views ``metrics``, ``manifest`` and ``summary``."""
        import duckdb

        con = duckdb.connect()
        loc = self.location
        try:
            if loc.local:  # DuckDB scans the files itself
                if loc.isdir("metrics"):
                    con.execute("create view metrics as select * from read_parquet("
                                f"'{loc.path('metrics', '**', '*.parquet')}', "
                                "hive_partitioning=true, union_by_name=true)")
                if loc.exists("manifest.parquet"):
                    con.execute("create view manifest as select * from read_parquet("
                                f"'{loc.path('manifest.parquet')}')")
                if loc.glob("summary-*.parquet"):
                    con.execute("create view summary as select * from read_parquet("
                                f"'{loc.path('summary-*.parquet')}')")
            else:  # remote: read with pyarrow through fsspec, hand DuckDB the Arrow tables
                import pyarrow.parquet as pq

                if loc.isdir("metrics"):
                    con.register("metrics", self._metrics_dataset().to_table())
                if loc.exists("manifest.parquet"):
                    con.register("manifest", pq.read_table(loc.path("manifest.parquet"),
                                                           filesystem=loc.fs))
                summaries = loc.glob("summary-*.parquet")
                if summaries:
                    import pyarrow as pa

                    con.register("summary", pa.concat_tables(
                        [pq.read_table(p, filesystem=loc.fs) for p in summaries]))
            return con.execute(query).df()
        except duckdb.Error as exc:
            raise StorageError(f"query failed on {self.root}: {exc}") from exc
        finally:
            con.close()


def _partition_schema():
    import pyarrow as pa

    return pa.schema([(p, pa.string()) for p in PARTITIONS])


def pa_schema_config():
    import pyarrow as pa

    return pa.schema([("config", pa.string())])


def _full_schema():
    import pyarrow as pa

    return pa.schema(list(METRICS_SCHEMA) + [pa.field(p, pa.string()) for p in PARTITIONS])


def open_run(root: str | os.PathLike[str]) -> Run:
    """Open a run folder for reading (see the module docstring for examples)."""
    return Run(root)
