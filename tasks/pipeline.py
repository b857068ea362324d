"""The explain pipeline's units of work, as plain functions (``flows.explain_dataset`` wraps
them as Prefect tasks): plan a run, explain a shard into the Zarr store, evaluate a shard into
Parquet, aggregate the paper's table, write the run manifest.

They pass paths and small JSON-able summaries, never tensors. Each one is idempotent: a shard
whose maps (metrics) are complete in the run folder is skipped, so re-running a run id resumes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shapcam.cpu import tune_allocator
from shapcam.data import ImageRecord, draw_records, load_example, open_dataset
from shapcam.errors import ShapCAMError
from shapcam.evaluate import (
    POINTING_COUNTS,
    MetricRow,
    image_seed,
    score_maps,
    summary_table,
)
from shapcam.methods import METHOD_TITLES, CAMMethod, build_method
from shapcam.models import INPUT_SIZE, LoadedModel, load_model
from storage import (
    SaliencyStore,
    TableSpec,
    open_run,
    write_image_index,
    write_manifest,
    write_metrics_shard,
    write_summary,
)
from storage.tables import metrics_exist

from .config import ModelSpec, RunConfig

_METRIC_COLUMNS = ("image_id", "target", "label", "protocol", "y", "o", "avg_drop", "increase",
                   "proportion", "pointing", "deletion", "insertion", "seconds")
#: Task logs: Prefect forwards this logger to the API (``PREFECT_LOGGING_EXTRA_LOGGERS``), so
#: the lines appear on the flow-run page, also from Dask worker processes.
log = logging.getLogger("tasks")
log.setLevel(logging.INFO)  # Prefect attaches its API handler but leaves the level at WARNING
_MODELS: dict[tuple[str, str, str | None, str], LoadedModel] = {}
_METHODS: dict[tuple[Any, ...], CAMMethod] = {}


def cached_model(spec: ModelSpec, device: str) -> LoadedModel:
    """Load a model once per worker process and reuse it across tasks."""
    key = (spec.name, spec.weights, spec.layer, device)
    if key not in _MODELS:
        if device.startswith("cpu"):
            tune_allocator()  # worker processes: keep freed activations for reuse
        _MODELS[key] = load_model(spec.name, spec.weights, target_layer=spec.layer,
                                  device=device)
    return _MODELS[key]


def cached_method(lm: LoadedModel, name: str, options: dict[str, Any]) -> CAMMethod:
    key = (id(lm), name, json.dumps(options, sort_keys=True))
    if key not in _METHODS:
        _METHODS[key] = build_method(name, lm, options)
    return _METHODS[key]


def _threads(config: RunConfig) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)


def record_to_dict(r: ImageRecord) -> dict[str, Any]:
    return {"image_id": r.image_id, "path": str(r.path), "label": r.label,
            "boxes": {str(c): np.asarray(b).tolist() for c, b in r.boxes.items()},
            "size": list(r.size) if r.size else None, "labels": list(r.labels),
            "error": r.error}


def image_index_row(r: ImageRecord) -> dict[str, Any]:
    """A record as a row of the run's image index (storage knows no ImageRecord)."""
    return {"image_id": r.image_id, "path": str(r.path), "label": r.label,
            "labels": list(r.labels) or [r.label],
            "boxes": [{"cls": int(c), "xmin": float(b[0]), "ymin": float(b[1]),
                       "xmax": float(b[2]), "ymax": float(b[3])}
                      for c, bs in r.boxes.items() for b in np.asarray(bs).reshape(-1, 4)],
            "width": r.size[0] if r.size else None, "height": r.size[1] if r.size else None,
            "error": r.error}


def record_from_dict(d: dict[str, Any]) -> ImageRecord:
    return ImageRecord(d["image_id"], Path(d["path"]), d["label"],
                       {int(c): np.asarray(b, dtype=np.float32).reshape(-1, 4)
                        for c, b in d["boxes"].items()},
                       tuple(d["size"]) if d["size"] else None, tuple(d["labels"]),
                       error=d["error"])


def plan_run(run_dir: str, run_id: str, config: RunConfig) -> dict[str, Any]:
    """Draw the images, create the store and one table per model; return the shard plan.

    A store that exists already must have been made with the same map options (resume).
    """
    records = draw_records(open_dataset(config.dataset, config.root, config.split),
                           config.n_images, config.seed)
    if not records:
        raise ShapCAMError(f"dataset {config.dataset} has no images")
    store = SaliencyStore.create(run_dir, run_id, {
        "config": config.to_dict(), "config_hash": config.hash(),
        "method_titles": {m: METHOD_TITLES[m] for m in config.methods},
        "versions": {"torch": torch.__version__, "numpy": np.__version__}})
    stored = RunConfig.from_dict(store.attrs["config"])
    changed = stored.changed_map_options(config)
    if changed:
        was = ", ".join(f"{k}={stored.map_options()[k]!r}" for k in changed)
        raise ShapCAMError(f"run {run_id} in {run_dir} was made with other options ({was}); "
                           "resume it with the same options, or start a new --run-id")
    write_image_index(run_dir, config.dataset, [image_index_row(r) for r in records])
    S = config.shard_size
    shards = [[record_to_dict(r) for r in records[k:k + S]] for k in range(0, len(records), S)]
    for spec in config.models:
        lm = cached_model(spec, "cpu")
        with torch.no_grad():
            from shapcam.split import split_model

            trunk, _ = split_model(lm.model, lm.target_layer)
            hw = tuple(trunk(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)).shape[-2:])
        raw_shapes = {}
        for m in config.methods:
            cam = cached_method(lm, m, config.options_for(m))
            raw_shapes[m] = tuple(cam.raw_shape(hw, (INPUT_SIZE, INPUT_SIZE)))
        store.init_table(config.dataset, spec.name, [r.image_id for r in records],
                         [r.label for r in records],
                         TableSpec(len(records), S, (INPUT_SIZE, INPUT_SIZE), raw_shapes),
                         {"weights": lm.weights, "target_layer": lm.target_layer,
                          "method_options": config.method_options,
                          "categories": list(lm.categories)})
    return {"run_dir": run_dir, "shards": shards, "n_images": len(records)}


def _load(records: Sequence[dict[str, Any]]):
    good, xs, failures = [], [], {}
    for i, d in enumerate(records):
        rec = record_from_dict(d)
        try:
            x, boxes, size = load_example(rec)
            good.append((i, rec, boxes, size))
            xs.append(x)
        except Exception as exc:  # noqa: BLE001 - any unreadable image is a per-image failure
            failures[rec.image_id] = str(exc)
    return good, xs, failures


def explain_shard(run_dir: str, config: RunConfig, model: ModelSpec, shard: int,
                  records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Compute every method's maps for one shard and write them; skip a completed shard."""
    dataset, name = config.dataset, model.name
    store = SaliencyStore(run_dir)
    if store.completed(dataset, name, shard):
        log.info("explain %s/%s shard %d: already complete, skipped", dataset, name, shard)
        return {"shard": shard, "model": name, "skipped": True}
    t0 = time.perf_counter()
    _threads(config)
    lm = cached_model(model, config.device)
    spec, _ = store.table(dataset, name)
    n = len(records)
    good, xs, failures = _load(records)
    idx = [i for i, *_ in good]
    images: dict[str, np.ndarray] = {
        "target": np.full(n, -1), "probability": np.full(n, np.nan), "width": np.full(n, -1),
        "height": np.full(n, -1), "boxes": np.full((n, 16, 4), np.nan)}
    for i, rec, _, (w, h) in good:
        images["width"][i], images["height"][i] = w, h
        b = rec.boxes_of(rec.label)[:16]
        images["boxes"][i, : len(b)] = b
    out: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    evaluations = 0
    x = torch.stack(xs).to(lm.device) if good else None
    seeds = [image_seed(config.seed, r.image_id) for _, r, _, _ in good]
    for m in config.methods:
        h, w = spec.raw_shapes[m]
        arrays = {"maps": np.full((n, INPUT_SIZE, INPUT_SIZE), np.nan, dtype=np.float16),
                  "raw": np.full((n, h, w), np.nan, dtype=np.float32)}
        if m in spec.stderr_methods:
            arrays["stderr"] = np.full((n, h, w), np.nan, dtype=np.float32)
        if good:
            cam = cached_method(lm, m, config.options_for(m))
            kwargs = {"seeds": seeds} if m == "shapcam" else {}
            t = time.perf_counter()
            result = cam(x, None, **kwargs)
            seconds[m] = (time.perf_counter() - t) / len(good)
            arrays["maps"][idx] = result.maps.half().cpu().numpy()
            arrays["raw"][idx] = result.raw.float().cpu().numpy()
            if "stderr" in arrays:
                arrays["stderr"][idx] = result.extras["stderr"].float().cpu().numpy()
                evaluations = int(result.extras["evaluations"].sum())
            images["target"][idx] = result.targets.cpu().numpy()
            images["probability"][idx] = result.probabilities.float().cpu().numpy()
        out[m] = arrays
    store.write_shard(dataset, name, shard, images, out,
                      record={"failures": failures, "seconds": seconds,
                              "shapcam_evaluations": evaluations,
                              "wall_seconds": time.perf_counter() - t0})
    written = sum(a.nbytes for arrays in out.values() for a in arrays.values())
    log.info("explain %s/%s shard %d: %d images read, %d failed%s; seconds per image: %s; "
             "%.1f MB of maps written", dataset, name, shard, len(good), len(failures),
             f" ({_failed_list(failures)})" if failures else "",
             ", ".join(f"{m} {t:.3f}" for m, t in seconds.items()) or "none", written / 1e6)
    return {"shard": shard, "model": name, "skipped": False, "images": n,
            "failed": len(failures), "seconds": time.perf_counter() - t0}


def metrics_complete(run_dir: str, config: RunConfig, model: str, shard: int) -> bool:
    return all(metrics_exist(run_dir, config.dataset, model, m, shard, config.protocol)
               for m in config.methods)


def evaluate_shard(run_dir: str, config: RunConfig, model: ModelSpec, shard: int,
                   records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of one shard from its stored maps into one Parquet file per method."""
    dataset, name = config.dataset, model.name
    if metrics_complete(run_dir, config, name, shard):
        log.info("evaluate %s/%s shard %d: already complete, skipped", dataset, name, shard)
        return {"shard": shard, "model": name, "skipped": True}
    t0 = time.perf_counter()
    _threads(config)
    store = SaliencyStore(run_dir)
    spec, g = store.table(dataset, name)
    sl = spec.shard_slice(shard)
    shard_record = store.shard_record(dataset, name, shard)
    failures: dict[str, str] = shard_record.get("failures", {})
    targets = g["images"]["target"][sl]
    good, xs, load_failures = _load(records)
    failures = {**load_failures, **failures}
    protocol = config.protocol
    lm = cached_model(model, config.device)
    run_id = store.attrs["run_id"]
    x = torch.stack(xs).to(lm.device) if good else None
    for m in config.methods:
        rows: list[dict[str, Any]] = []
        for d in records:
            if d["image_id"] in failures:
                rows.append({"run_id": run_id, "image_id": d["image_id"], "label": d["label"],
                             "protocol": protocol, "error": failures[d["image_id"]]})
        if good:
            idx = [i for i, *_ in good]
            maps = torch.from_numpy(store.read_shard(dataset, name, m, shard)[idx]
                                    .astype(np.float32)).to(lm.device)
            tg = torch.from_numpy(targets[idx].astype(np.int64)).to(lm.device)
            secs = shard_record.get("seconds", {}).get(m, math.nan)
            for r in score_maps(lm.model, x, maps, tg, [(rec, b) for _, rec, b, _ in good], m,
                                protocol, config.causal_pixels, secs, seed=config.seed,
                                pg_class=config.pg_class):
                row = {k: getattr(r, k) for k in _METRIC_COLUMNS}
                # Not applicable is NULL in the tables (SQL aggregates skip it; NaN would not).
                rows.append({k: None if isinstance(v, float) and math.isnan(v) and
                             k != "seconds" else v for k, v in row.items()}
                            | {"run_id": run_id, "evaluations": None})
        path = write_metrics_shard(run_dir, dataset, name, m, shard, rows, protocol)
        log.info("evaluate %s/%s shard %d, %s (%s): %d rows, %d failed, written to %s",
                 dataset, name, shard, m, protocol, len(rows), len(failures), path)
    return {"shard": shard, "model": name, "skipped": False,
            "seconds": time.perf_counter() - t0}


def _failed_list(failures: dict[str, str], shown: int = 3) -> str:
    items = [f"{k}: {v}" for k, v in list(failures.items())[:shown]]
    return "; ".join(items) + (f"; and {len(failures) - shown} more" if len(failures) > shown
                               else "")


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
