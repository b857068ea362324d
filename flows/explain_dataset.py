"""The ``explain-dataset`` flow: plan -> explain_shard -> evaluate_shard -> aggregate -> report.

Each shard's evaluation is submitted right behind its explanation (``wait_for`` that one task
only), so a shard is evaluated as soon as its maps exist; there is no global barrier. Tasks run on
Dask (prefect-dask's ``DaskTaskRunner``): a local cluster by default, an existing scheduler with
``dask_address``. With CUDA every task asks for one ``GPU`` resource, so a cluster whose workers
declare ``--resources GPU=1`` runs one task per GPU.
"""

from __future__ import annotations

import contextlib
import math
import time
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

from storage import SaliencyStore, open_run, write_manifest
from tasks.report import write_report
from tasks.shards import aggregate, config_hash, evaluate_shard, explain_shard, plan_run

explain_task = task(explain_shard, name="explain_shard", retries=2, retry_delay_seconds=5,
                    persist_result=False)
evaluate_task = task(evaluate_shard, name="evaluate_shard", retries=2, retry_delay_seconds=5,
                     persist_result=False)


def _gpu_annotation(device: str):
    if device.startswith("cuda"):
        import dask

        return dask.annotate(resources={"GPU": 1})
    return contextlib.nullcontext()


def _table_markdown(tables: dict[str, Any], config: dict[str, Any]) -> str:
    parts = []
    for model, table in tables.items():
        cols = table["columns"]
        lines = [f"### {config['dataset']} / {model} (protocol `{config['protocol']}`)", "",
                 "| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for row in table["rows"]:
            lines.append(f"| {row['metric']} | " + " | ".join(
                "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
                for v in row["values"]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


@flow(name="explain-dataset", flow_run_name="explain {config[dataset]} ({run_id})",
      log_prints=True)
def explain_dataset(run_dir: str, run_id: str, config: dict[str, Any]) -> dict[str, Any]:
    """Explain and evaluate a dataset into ``run_dir`` (Zarr maps, Parquet metrics, report).

    ``config`` keys: dataset, root, split, n_images, seed, shard_size, models
    (``[{"name", "weights", "layer"}]``), methods, method_options, protocol, causal, device.
    Re-running with the same ``run_dir`` and ``run_id`` skips completed shards.
    """
    logger = get_run_logger()
    started = datetime.now(UTC)
    plan = plan_run(run_dir, run_id, config)
    shards = plan["shards"]
    n_shards = len(shards)
    total = n_shards * len(config["models"])
    logger.info("run %s: %d images in %d shards x %d models -> %s", run_id, plan["n_images"],
                n_shards, len(config["models"]), run_dir)
    progress = create_progress_artifact(0.0, key=f"progress-{_key(run_id)}",
                                        description=f"shards done of {total}")
    tasks_started = time.perf_counter()
    futures = []
    with _gpu_annotation(config.get("device", "cpu")):
        for model in config["models"]:
            for k, records in enumerate(shards):
                label = f"{model['name']} shard {k + 1}/{n_shards}"
                e = explain_task.with_options(task_run_name=f"explain {label}").submit(
                    run_dir, config, model, k, records)
                futures.append(evaluate_task.with_options(
                    task_run_name=f"evaluate {label}").submit(run_dir, config, model, k,
                                                               records, wait_for=[e]))
    # One future per shard (its evaluation, which waits for its explanation): the progress
    # artifact for the UI, a bar for the terminal; a task's exception stops here.
    with tqdm(total=len(futures), desc=f"run {run_id}", unit="shard") as bar:
        for done, fut in enumerate(as_completed(futures), start=1):
            summary = fut.result()
            bar.set_postfix_str(f"{summary['model']} shard {summary['shard'] + 1}")
            bar.update()
            update_progress_artifact(progress, 100.0 * done / len(futures))
    task_seconds = time.perf_counter() - tasks_started
    tables = aggregate(run_dir, config)
    write_run_manifest(run_dir, run_id, config, plan, started)
    for model, table in tables.items():
        create_table_artifact(
            key=f"summary-{_key(run_id)}-{_key(model)}",
            table=[{"metric": r["metric"], **{c: v for c, v in zip(table["columns"],
                                                                  r["values"], strict=True)}}
                   for r in table["rows"]],
            description=f"{config['dataset']} / {model}, protocol {config['protocol']}")
    report = write_report(run_dir, config, tables)
    markdown = _table_markdown(tables, config)
    create_markdown_artifact(key=f"report-{_key(run_id)}",
                             markdown=markdown + f"\n\nReport: `{report}`  \nStore: `{run_dir}`",
                             description="Shap-CAM run summary")
    print(markdown)
    return {"run_dir": run_dir, "report": str(report), "tables": tables,
            "images": plan["n_images"], "shards": total, "task_seconds": task_seconds,
            "skipped": sum(bool(f.result().get("skipped")) for f in futures)}


def write_run_manifest(run_dir: str, run_id: str, config: dict[str, Any],
                       plan: dict[str, Any], started: datetime) -> None:
    """One manifest row per dataset x model: status, shard counts, failures, timings."""
    store, run = SaliencyStore(run_dir), open_run(run_dir)
    finished = datetime.now(UTC)
    rows = []
    for model in config["models"]:
        status = store.shard_status(config["dataset"], model["name"])
        failed = run.sql(f"select count(distinct image_id) as n from metrics where model = "
                         f"'{model['name']}' and error is not null")["n"][0]
        rows.append({"run_id": run_id, "config_hash": config_hash(config),
                     "status": "completed" if all(status.values()) else "incomplete",
                     "dataset": config["dataset"], "model": model["name"],
                     "shards_total": len(status), "shards_done": sum(status.values()),
                     "images": plan["n_images"], "failed_images": int(failed),
                     "started_at": started, "finished_at": finished,
                     "seconds": (finished - started).total_seconds()})
    write_manifest(run_dir, rows)


def _key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "run"



@flow(name="evaluate-store", flow_run_name="evaluate {run_id} ({protocol})")
def evaluate_store(run_dir: str, run_id: str, protocol: str = "scorecam",
                   causal: bool = True) -> dict[str, Any]:
    """(Re)compute the metrics of an existing store with ``protocol`` without recomputing maps.

    Metrics files carry their protocol, so a second variant never overwrites the first; shards
    already evaluated with this protocol are skipped.
    """
    store = SaliencyStore(run_dir)
    config = {**store.attrs["config"], "protocol": protocol, "causal": causal}
    plan = plan_run(run_dir, run_id, config)  # idempotent: same sample, same tables
    futures = []
    with _gpu_annotation(config.get("device", "cpu")):
        for model in config["models"]:
            for k, records in enumerate(plan["shards"]):
                if not store.completed(config["dataset"], model["name"], k):
                    raise ValueError(f"shard {k} of {model['name']} has no maps yet: finish the "
                                     f"run with `shapcam run --run-id {run_id}` first")
                futures.append(evaluate_task.with_options(
                    task_run_name=f"evaluate {model['name']} shard {k + 1}/"
                                  f"{len(plan['shards'])} ({protocol})").submit(
                    run_dir, config, model, k, records))
    for fut in as_completed(futures):
        fut.result()
    tables = aggregate(run_dir, config)
    create_markdown_artifact(key=f"report-{_key(run_id)}-{_key(protocol)}",
                             markdown=_table_markdown(tables, config),
                             description=f"metrics with protocol {protocol}")
    return {"run_dir": run_dir, "tables": tables, "images": plan["n_images"]}
