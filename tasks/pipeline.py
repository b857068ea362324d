"""The explain pipeline's units of work, as plain functions (``flows.explain_dataset`` wraps
them as Prefect tasks): plan a run (:mod:`.plan`), explain a shard into the Zarr store and/or
evaluate it into Parquet (:mod:`.shard`), aggregate the paper's table and write the run
manifest (:mod:`.summary`); what a worker keeps between tasks is in :mod:`.workers`.

They pass paths and small JSON-able summaries, never tensors. Each one is idempotent: a shard
whose maps (metrics) are complete in the run folder is skipped, so re-running a run id resumes.
"""

from .plan import (
    complete_shards,
    image_index_row,
    plan_run,
    record_from_dict,
    record_to_dict,
)
from .shard import evaluate_shard, explain_shard, metrics_complete, process_shard
from .summary import aggregate, write_run_manifest
from .workers import BuildsAlone, cached_method, cached_model, worker_identity

__all__ = ["BuildsAlone", "aggregate", "cached_method", "cached_model", "complete_shards",
           "evaluate_shard",
           "explain_shard", "image_index_row", "metrics_complete", "plan_run", "process_shard",
           "record_from_dict", "record_to_dict", "worker_identity", "write_run_manifest"]
