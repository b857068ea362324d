"""The end of a run: the paper's table per model (:func:`aggregate`) and the run manifest.

Both read the run's consolidated metrics table (:mod:`storage.metrics_table`, rebuilt here
first) with one SQL group-by each, so their cost is one scan of one file whatever the shard
size. :func:`shapcam.evaluation.evaluate.summary_table` computes the same table from rows in
memory (the plain loop's); the tests hold the two equal.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from shapcam.evaluation.evaluate import FIELD_ROWS, POINTING_COUNTS, TABLE_ROWS
from shapcam.methods import METHOD_TITLES
from storage import SaliencyStore, open_run, write_manifest, write_summary
from storage.metrics_table import consolidate

from .config import RunConfig

#: SQL of "explained" and "a value" (metric columns hold NaN or NULL where there is none).
_OK = "error is null"


def _value(column: str) -> str:
    return f"{column} is not null and not isnan({column})"


def summary_query(columns: list[tuple[str, str]]) -> str:
    """One group-by (model, method) giving every table row and count of :func:`aggregate`;
    ``columns``: ``(metric column, "mean" | "percent")``. Parameter: the protocol."""
    values = [f"{'100 * ' if how == 'percent' else ''}avg({c}) filter (where {_OK} and "
              f"{_value(c)}) as \"{c}\"" for c, how in columns]
    computed = [f"count(*) filter (where {_value(c)}) as \"n_{c}\"" for _, c, _ in FIELD_ROWS]
    return ("select model, method, " + ", ".join(values + computed) + ", "
            f"count(distinct image_id) filter (where {_OK}) as images, "
            f"count(*) filter (where {_OK}) as explanations, "
            "count(*) filter (where error is not null and error <> '') as failed, "
            f"count(*) filter (where {_value('proportion')}) as proportion_images, "
            f"count(*) filter (where {_OK} and pointing = 'no box') as pointing_no_box, "
            f"coalesce(sum(seconds) filter (where {_OK}), 0) as seconds "
            "from metrics where protocol = ? group by model, method")


def summary_tables(df: pd.DataFrame, config: RunConfig) -> dict[str, dict[str, Any]]:
    """The group-by of :func:`summary_query` as :func:`summary_table`'s dict per model."""
    methods = list(config.methods)
    tables = {}
    for spec in config.models:
        part = df[df["model"] == spec.name].set_index("method").reindex(methods)

        def col(name: str, part: pd.DataFrame = part) -> dict[str, Any]:
            return {m: part.at[m, name] for m in methods}

        counts = {k: {m: int(v) if not pd.isna(v) else 0 for m, v in col(k).items()}
                  for k in ("images", "explanations", "failed", "proportion_images",
                            "pointing_no_box")}
        rows = list(TABLE_ROWS) + [r for r in FIELD_ROWS
                                   if part[f"n_{r[1]}"].fillna(0).sum() > 0]
        table: dict[str, Any] = {"columns": [METHOD_TITLES.get(m, m) for m in methods],
                                 "rows": [{"metric": label, "values": [_none(v) for v in
                                                                       col(key).values()]}
                                          for label, key, _ in rows], **counts}
        table["seconds_per_image"] = {m: float(_none(s) or 0.0) / max(1, counts["images"][m])
                                      for m, s in col("seconds").items()}
        tables[spec.name] = table
    return tables


def _none(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) or pd.isna(v) \
        else float(v)


def aggregate(run_dir: str, config: RunConfig) -> dict[str, Any]:
    """Consolidate the protocol's metrics, then the run summary (paper's table per model)
    into ``summary-<protocol>.parquet``."""
    consolidate(run_dir, config.protocol)
    run = open_run(run_dir)
    df = run.query_metrics(summary_query([(k, how) for _, k, how in TABLE_ROWS + FIELD_ROWS]),
                           [config.protocol]) if run.location.isdir("metrics") else \
        pd.DataFrame(columns=["model", "method"])
    if df.empty:
        df = pd.DataFrame(columns=["model", "method", *(f"n_{k}" for _, k, _ in FIELD_ROWS)])
    tables = summary_tables(df, config)
    run_id = SaliencyStore(run_dir).attrs["run_id"]
    summary_rows = []
    for name, table in tables.items():
        common = {"run_id": run_id, "dataset": config.dataset, "model": name,
                  "protocol": config.protocol}
        for row in table["rows"]:
            summary_rows += [{**common, "method": m, "metric": row["metric"], "value": value,
                              "images": table["images"][m]}
                             for m, value in zip(config.methods, row["values"], strict=True)]
        for label, key in POINTING_COUNTS:  # the dashboard's table shows them too
            summary_rows += [{**common, "method": m, "metric": label, "value": float(n),
                              "images": table["images"][m]} for m, n in table[key].items()]
    write_summary(run_dir, summary_rows, config.protocol)
    return tables


def write_run_manifest(run_dir: str, run_id: str, config: RunConfig, plan: dict[str, Any],
                       started: datetime) -> None:
    """One manifest row per dataset x model: status, shard counts, failures, timings."""
    store, run = SaliencyStore(run_dir), open_run(run_dir)
    finished = datetime.now(UTC)
    failed = run.query_metrics(
        "select model, count(distinct image_id) as n from metrics where error is not null "
        "group by model") if run.location.isdir("metrics") else pd.DataFrame(
        columns=["model", "n"])
    failed_by_model = dict(zip(failed["model"], failed["n"], strict=True))
    rows = []
    for model in config.models:
        status = store.shard_status(config.dataset, model.name)
        rows.append({"run_id": run_id, "config_hash": config.hash(),
                     "status": "completed" if all(status.values()) else "incomplete",
                     "dataset": config.dataset, "model": model.name,
                     "shards_total": len(status), "shards_done": sum(status.values()),
                     "images": plan["n_images"],
                     "failed_images": int(failed_by_model.get(model.name, 0)),
                     "started_at": started, "finished_at": finished,
                     "seconds": (finished - started).total_seconds()})
    write_manifest(run_dir, rows)
