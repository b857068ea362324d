"""Persistence and queries: the Zarr saliency store, Parquet tables, the query API.

Imports numpy, zarr, pyarrow (pandas, duckdb, xarray for queries); never torch or Prefect.
"""

from .errors import IncompleteShardError, NotARunError, SchemaVersionError, StorageError
from .names import RUN_ID_RULE, check_run_id
from .query import Run, open_run, run_folders
from .saliency import SCHEMA_VERSION, SaliencyStore, TableSpec
from .tables import (
    write_image_index,
    write_manifest,
    write_metrics_shard,
    write_summary,
    write_training_epoch,
)

__all__ = ["RUN_ID_RULE", "SCHEMA_VERSION", "IncompleteShardError", "NotARunError", "Run",
           "SaliencyStore", "SchemaVersionError", "StorageError", "TableSpec", "check_run_id",
           "open_run", "run_folders", "write_image_index", "write_manifest",
           "write_metrics_shard", "write_summary", "write_training_epoch"]
