"""The ``explain-dataset`` flow: plan -> process shard (maps, then metrics) -> aggregate ->
report, and ``evaluate-store`` (another protocol variant from a run's stored maps).

One task per shard explains it and evaluates it from the same decoded images (each image is read
and decoded once), so a shard's metrics exist as soon as its maps do; there is no global barrier.
Tasks run on Dask (prefect-dask's ``DaskTaskRunner``): a local cluster by default (one worker
per GPU with CUDA), an existing scheduler with ``--dask-address``. Every task asks for the run's
resources (``GPU=1`` with CUDA), and the flow checks first that some worker offers them, so a
cluster without them fails within ``resource_wait`` seconds instead of waiting forever.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from tqdm import tqdm

from dashboards.render import code_span
from shapcam.errors import ShapCAMError
from storage import SaliencyStore
from storage.lock import run_lock
from tasks.config import RunConfig
from tasks.pipeline import (
    aggregate,
    complete_shards,
    evaluate_shard,
    plan_run,
    process_shard,
    write_run_manifest,
)
from tasks.reports import tables_markdown, write_report

from .runtime import artifact_key, require_resources, resource_annotation

shard_task = task(process_shard, name="process_shard", retries=2, retry_delay_seconds=5,
                  persist_result=False)
evaluate_task = task(evaluate_shard, name="evaluate_shard", retries=2, retry_delay_seconds=5,
                     persist_result=False)


def _summary_artifacts(run_id: str, config: RunConfig, tables: dict[str, Any]) -> None:
    for model, table in tables.items():
        create_table_artifact(
            key=artifact_key("summary", run_id, model),
            table=[{"metric": r["metric"], **dict(zip(table["columns"], r["values"],
                                                      strict=True))} for r in table["rows"]],
            description=f"{config.dataset} / {model}, protocol {config.protocol}")


def one_writer(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn(run_dir, ...)`` holding the run's lock (:func:`storage.lock.run_lock`): two
    runs of one id, from the CLI, a deployment or ``serve``, never write at once."""
    @functools.wraps(fn)
    def locked(run_dir: str, *args: Any, **kwargs: Any) -> Any:
        with run_lock(run_dir):
            return fn(run_dir, *args, **kwargs)
    return locked


@flow(name="explain-dataset", flow_run_name="explain {config[dataset]} ({run_id})",
      log_prints=True)
@one_writer
def explain_dataset(run_dir: str, run_id: str, config: dict[str, Any]) -> dict[str, Any]:
    """Explain and evaluate a dataset into ``run_dir`` (Zarr maps, Parquet metrics, report).

    ``config``: a :class:`tasks.config.RunConfig` as a dict. Re-running with the same
    ``run_dir`` and ``run_id`` skips completed shards.
    """
    cfg = RunConfig.from_dict(config)
    logger = get_run_logger()
    started = datetime.now(UTC)
    plan = plan_run(run_dir, run_id, cfg)
    shards = plan["shards"]
    total = len(shards) * len(cfg.models)
    done = complete_shards(run_dir, cfg, len(shards))  # decided once: done shards cost nothing
    logger.info("run %s: %d images in %d shards x %d models -> %s (%d shards done before)",
                run_id, plan["n_images"], len(shards), len(cfg.models), run_dir, len(done))
    progress = create_progress_artifact(100.0 * len(done) / total,
                                        key=artifact_key("progress", run_id),
                                        description=f"shards done of {total}")
    tasks_started = time.perf_counter()
    futures = []
    todo = [(m, k) for m in cfg.models for k in range(len(shards)) if (m.name, k) not in done]
    if todo:
        require_resources(cfg.task_resources, cfg.resource_wait)
    with resource_annotation(cfg.task_resources):
        for model, k in todo:
            futures.append(shard_task.with_options(
                task_run_name=f"{model.name} shard {k + 1}/{len(shards)}").submit(
                run_dir, cfg, model, k, shards[k]))
    # One future per shard to do: the progress artifact for the UI, a bar for the terminal
    # (done shards counted in from the start); a task's exception stops here.
    with tqdm(total=total, initial=len(done), desc=f"run {run_id}", unit="shard") as bar:
        for n, fut in enumerate(as_completed(futures), start=len(done) + 1):
            summary = fut.result()
            bar.set_postfix_str(f"{summary['model']} shard {summary['shard'] + 1}")
            bar.update()
            update_progress_artifact(progress, 100.0 * n / total)
    task_seconds = time.perf_counter() - tasks_started
    tables = aggregate(run_dir, cfg)
    report = write_report(run_dir, cfg, tables)
    # last: "completed" in the manifest means the summary and the report are written too
    write_run_manifest(run_dir, run_id, cfg, plan, started)
    _summary_artifacts(run_id, cfg, tables)
    markdown = tables_markdown(cfg, tables)
    create_markdown_artifact(key=artifact_key("report", run_id),
                             markdown=markdown + f"\n\nReport: {code_span(report)}  \n"
                             f"Store: {code_span(run_dir)}",
                             description="Shap-CAM run summary")
    print(markdown)
    return {"run_dir": run_dir, "report": str(report), "tables": tables,
            "images": plan["n_images"], "shards": total, "task_seconds": task_seconds,
            "skipped": len(done) + sum(bool(f.result().get("skipped")) for f in futures)}


@flow(name="evaluate-store", flow_run_name="evaluate {run_id} ({protocol})")
@one_writer
def evaluate_store(run_dir: str, run_id: str, protocol: str = "scorecam",
                   causal: bool = True) -> dict[str, Any]:
    """(Re)compute the metrics of an existing store with ``protocol`` without recomputing maps.

    Metrics files carry their protocol, so a second variant never overwrites the first; shards
    already evaluated with this protocol are skipped.
    """
    store = SaliencyStore(run_dir)
    cfg = RunConfig.from_dict(store.attrs["config"]).replace(protocol=protocol, causal=causal)
    plan = plan_run(run_dir, run_id, cfg)  # idempotent: same sample, same tables
    n_shards = len(plan["shards"])
    done = complete_shards(run_dir, cfg, n_shards, explain=False)
    futures = []
    todo = [(m, k) for m in cfg.models for k in range(n_shards) if (m.name, k) not in done]
    maps = {m.name: store.shard_status(cfg.dataset, m.name) for m in cfg.models}
    for model, k in todo:
        if not maps[model.name][k]:
            raise ShapCAMError(f"shard {k} of {model.name} has no maps yet: finish the "
                               f"run with `shapcam run --run-id {run_id}` first")
    if todo:
        require_resources(cfg.task_resources, cfg.resource_wait)
    with resource_annotation(cfg.task_resources):
        for model, k in todo:
            futures.append(evaluate_task.with_options(
                task_run_name=f"evaluate {model.name} shard {k + 1}/{n_shards} "
                              f"({protocol})").submit(run_dir, cfg, model, k, plan["shards"][k]))
    for fut in as_completed(futures):
        fut.result()
    tables = aggregate(run_dir, cfg)
    create_markdown_artifact(key=artifact_key("report", run_id, protocol),
                             markdown=tables_markdown(cfg, tables),
                             description=f"metrics with protocol {protocol}")
    return {"run_dir": run_dir, "tables": tables, "images": plan["n_images"]}
