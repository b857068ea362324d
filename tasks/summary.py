"""The end of a run: the paper's table per model (:func:`aggregate`) and the run manifest."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from shapcam.evaluation.evaluate import POINTING_COUNTS, MetricRow, summary_table
from storage import SaliencyStore, open_run, write_manifest, write_summary

from .config import RunConfig


def aggregate(run_dir: str, config: RunConfig) -> dict[str, Any]:
    """The run summary (paper's table per model) into ``summary-<protocol>.parquet``."""
    run = open_run(run_dir)
    df = run.metrics(filters=[("protocol", "=", config.protocol)])
    run_id = SaliencyStore(run_dir).attrs["run_id"]
    tables, summary_rows = {}, []
    fields = set(MetricRow.__dataclass_fields__)
    for spec in config.models:
        name = spec.name
        part = df[df["model"] == name]
        rows = []
        for r in part.to_dict("records"):
            clean = {k: (math.nan if v is None or (isinstance(v, float) and math.isnan(v))
                         else v) for k, v in r.items() if k in fields}
            clean["error"] = r["error"] if isinstance(r.get("error"), str) else None
            clean["pointing"] = r["pointing"] if isinstance(r.get("pointing"), str) else ""
            rows.append(MetricRow(**{k: clean.get(k, MetricRow.__dataclass_fields__[k].default)
                                     for k in fields}))
        table = summary_table(rows, config.methods)
        tables[name] = table
        for row in table["rows"]:
            for m, value in zip(config.methods, row["values"], strict=True):
                summary_rows.append({"run_id": run_id, "dataset": config.dataset,
                                     "model": name, "method": m, "protocol": config.protocol,
                                     "metric": row["metric"], "value": value,
                                     "images": table["images"][m]})
        for label, key in POINTING_COUNTS:  # the dashboard's table shows them too
            summary_rows += [{"run_id": run_id, "dataset": config.dataset, "model": name,
                              "method": m, "protocol": config.protocol, "metric": label,
                              "value": float(n), "images": table["images"][m]}
                             for m, n in table[key].items()]
    write_summary(run_dir, summary_rows, config.protocol)
    return tables


def write_run_manifest(run_dir: str, run_id: str, config: RunConfig, plan: dict[str, Any],
                       started: datetime) -> None:
    """One manifest row per dataset x model: status, shard counts, failures, timings."""
    store, run = SaliencyStore(run_dir), open_run(run_dir)
    finished = datetime.now(UTC)
    rows = []
    for model in config.models:
        status = store.shard_status(config.dataset, model.name)
        failed = run.sql("select count(distinct image_id) as n from metrics where model = "
                         f"'{model.name.replace(chr(39), chr(39) * 2)}' and error is not null"
                         )["n"][0]
        rows.append({"run_id": run_id, "config_hash": config.hash(),
                     "status": "completed" if all(status.values()) else "incomplete",
                     "dataset": config.dataset, "model": model.name,
                     "shards_total": len(status), "shards_done": sum(status.values()),
                     "images": plan["n_images"], "failed_images": int(failed),
                     "started_at": started, "finished_at": finished,
                     "seconds": (finished - started).total_seconds()})
    write_manifest(run_dir, rows)
