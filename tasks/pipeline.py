"""The explain pipeline's units of work, as plain functions (``flows.explain_dataset`` wraps
them as Prefect tasks): plan a run, explain a shard into the Zarr store, evaluate a shard into
Parquet, aggregate the paper's table, write the run manifest.

They pass paths and small JSON-able summaries, never tensors. Each one is idempotent: a shard
whose maps (metrics) are complete in the run folder is skipped, so re-running a run id resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from shapcam.cpu import tune_allocator
from shapcam.data import ImageRecord, draw_records, open_dataset
from shapcam.data.stream import decode_threads, decoded_batches, image_batch, stack
from shapcam.errors import ShapCAMError
from shapcam.evaluate import (
    POINTING_COUNTS,
    MetricRow,
    method_call_options,
    randomised_maps,
    randomised_models,
    score_maps,
    stored_precision,
    summary_table,
    target_slots,
)
from shapcam.field_metrics import FIELD_METRICS
from shapcam.methods import METHOD_TITLES, CAMMethod, build_method
from shapcam.models import INPUT_SIZE, LoadedModel, load_model
from shapcam.precision import autocast, channels_last, measured_gpu_batch, to_channels_last
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
                   "proportion", "pointing", "deletion", "insertion", "seconds",
                   *(c for cols in FIELD_METRICS.values() for c in cols))
#: Task logs: Prefect forwards this logger to the API (``PREFECT_LOGGING_EXTRA_LOGGERS``), so
#: the lines appear on the flow-run page, also from Dask worker processes.
log = logging.getLogger("tasks")
log.setLevel(logging.INFO)  # Prefect attaches its API handler but leaves the level at WARNING


class BuildsAlone:
    """Builds run alone in the process; computes run together, never during a build.

    ``torch.fx`` tracing (how a method splits its model) patches ``nn.Module.__call__`` for the
    whole process while it runs, so a model run on another thread meanwhile (a second shard
    task of the worker, or its image decoders) breaks the trace ("module is not installed as
    a submodule") or is traced into it. A build waits for running computes to finish and
    holds new ones back; it is reentrant on its own thread.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._computing = 0
        self._builder: int | None = None
        self._depth = 0
        self._waiting = 0

    @contextlib.contextmanager
    def build(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._builder != me:
                self._waiting += 1
                self._cond.wait_for(lambda: self._builder is None and not self._computing)
                self._waiting -= 1
                self._builder = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._builder = None
                    self._cond.notify_all()

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._builder is None and not self._waiting)
            self._computing += 1
        try:
            yield
        finally:
            with self._cond:
                self._computing -= 1
                self._cond.notify_all()


_BUILDS = BuildsAlone()
_MODELS: dict[tuple[Any, ...], LoadedModel] = {}  # per (spec, device, layout, thread)
_METHODS: dict[tuple[Any, ...], CAMMethod] = {}
_RANDOMISED: dict[int, list[LoadedModel]] = {}  # MPRT copies per loaded model


def cached_model(spec: ModelSpec, device: str, nhwc: bool = False) -> LoadedModel:
    """Load a model once per worker thread and reuse it across tasks (``nhwc``: in the
    channels-last memory format). Per thread, so tasks running at once on one worker
    (``--tasks-per-gpu``) share no model and no method built on it: the fallback split hooks
    the model's modules for the length of a call."""
    key = (spec.name, spec.weights, spec.layer, device, nhwc, threading.get_ident())
    if key not in _MODELS:
        if device.startswith("cpu"):
            tune_allocator()  # worker processes: keep freed activations for reuse
        with _BUILDS.build():  # finding the default layer runs the model
            lm = load_model(spec.name, spec.weights, target_layer=spec.layer, device=device)
        if nhwc:
            to_channels_last(lm.model)
        _MODELS[key] = lm
    return _MODELS[key]


_GPU_BATCH: dict[tuple[int, str], int] = {}
#: Methods whose ``batch_size`` option is images per forward (the run's forward batch).
_FORWARD_BATCHED = ("rise", "scorecam")


def forward_batch_for(lm: LoadedModel, config: RunConfig) -> int | None:
    """Images per forward of the perturbation methods and metrics: ``config.forward_batch``,
    else measured from free memory on a GPU (once per worker thread; the ``tasks_per_gpu``
    tasks in flight share that memory), else None (4 on CPU)."""
    if config.forward_batch is not None:
        return config.forward_batch
    if lm.device.type != "cuda":
        return None
    key = (id(lm), config.precision)
    if key not in _GPU_BATCH:
        with _BUILDS.build():  # a probe forward
            measured = measured_gpu_batch(lm.model, lm.device, precision=config.precision)
        _GPU_BATCH[key] = max(1, measured // config.tasks_per_gpu)
    return _GPU_BATCH[key]


def method_options_for(config: RunConfig, method: str, forward: int | None) -> dict[str, Any]:
    options = config.options_for(method)
    if forward is not None and method in _FORWARD_BATCHED and options.get("batch_size") is None:
        return {**options, "batch_size": forward}
    return options


def cached_randomised(lm: LoadedModel) -> list[LoadedModel]:
    """The MPRT copies of ``lm`` (one per checkpoint), made once per loaded model."""
    if id(lm) not in _RANDOMISED:
        with _BUILDS.build():
            _RANDOMISED[id(lm)] = randomised_models(lm)
    return _RANDOMISED[id(lm)]


def cached_method(lm: LoadedModel, name: str, options: dict[str, Any]) -> CAMMethod:
    key = (id(lm), name, json.dumps(options, sort_keys=True))
    if key not in _METHODS:
        with _BUILDS.build():  # traces the model
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
        raw_shapes = {}
        for m in config.methods:
            cam = cached_method(lm, m, config.options_for(m))
            hw = cam.feature_hw((INPUT_SIZE, INPUT_SIZE))
            raw_shapes[m] = tuple(cam.raw_shape(hw, (INPUT_SIZE, INPUT_SIZE)))
        store.init_table(config.dataset, spec.name, [r.image_id for r in records],
                         [r.label for r in records],
                         TableSpec(len(records), S, (INPUT_SIZE, INPUT_SIZE), raw_shapes,
                                   n_targets=config.target_spec.slots(records)),
                         {"weights": lm.weights, "target_layer": lm.target_layer,
                          "method_options": config.method_options,
                          "categories": list(lm.categories)})
    return {"run_dir": run_dir, "shards": shards, "n_images": len(records)}


def stored_slots(targets: np.ndarray, device: torch.device
                 ) -> list[tuple[int, list[int], torch.Tensor]]:
    """``(slot, positions, classes)`` of images whose maps are stored: ``targets (n,)`` or
    ``(n, T)``, -1 where an image has no class in a slot."""
    grid = targets.reshape(targets.shape[0], -1)
    slots = []
    for j in range(grid.shape[1]):
        pos = np.flatnonzero(grid[:, j] >= 0).tolist()
        if pos:
            slots.append((j, pos, torch.from_numpy(grid[pos, j].astype(np.int64)).to(device)))
    return slots


def worker_identity() -> str:
    """The Dask worker running this task (its address), else ``host:pid``."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


def _metric_row(r: MetricRow, run_id: str, seconds: float) -> dict[str, Any]:
    row = {k: getattr(r, k) for k in _METRIC_COLUMNS} | {"seconds": seconds}
    # Not applicable is NULL in the tables (SQL aggregates skip it; NaN would not).
    return {k: None if isinstance(v, float) and math.isnan(v) and k != "seconds" else v
            for k, v in row.items()} | {"run_id": run_id, "evaluations": None}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_shard(run_dir: str, config: RunConfig, model: ModelSpec, shard: int,
                  records: Sequence[dict[str, Any]], *, explain: bool = True,
                  evaluate: bool = True) -> dict[str, Any]:
    """Explain one shard into the store and/or evaluate it into Parquet, reading and decoding
    each image once (:func:`shapcam.data.stream.decoded_batches`: compute batches of
    ``config.batch_images``, decoded ahead on ``config.decode_threads`` threads).

    Whatever is complete already is skipped: maps stored by an earlier attempt are read back
    for the metrics (as ``evaluate-store`` does), so a resumed shard never recomputes them.
    Metrics are computed from the maps at the store's precision (float16), so they are the
    same whether the maps come from this call or from the store.
    """
    dataset, name = config.dataset, model.name
    store = SaliencyStore(run_dir)
    have_maps = store.completed(dataset, name, shard)
    make_maps = explain and not have_maps
    score = evaluate and not metrics_complete(run_dir, config, name, shard)
    if not (make_maps or score):
        log.info("%s/%s shard %d: already complete, skipped", dataset, name, shard)
        return {"shard": shard, "model": name, "skipped": True}
    if score and not (have_maps or make_maps):
        raise ShapCAMError(f"shard {shard} of {name} has no maps yet: run the explain step "
                           "(shapcam run with the same --run-id) first")
    t0, started_at = time.perf_counter(), time.time()
    _threads(config)
    lm = cached_model(model, config.device, config.channels_last)
    forward = forward_batch_for(lm, config)
    spec, g = store.table(dataset, name)
    n = len(records)
    recs = [record_from_dict(d) for d in records]
    methods = config.methods
    shard_record = {} if make_maps else store.shard_record(dataset, name, shard)
    failures: dict[str, str] = dict(shard_record.get("failures", {}))
    T = spec.per_image  # () or (n_targets,): the class axis
    if make_maps:
        images: dict[str, np.ndarray] = {
            "target": np.full((n, *T), -1), "probability": np.full((n, *T), np.nan),
            "width": np.full(n, -1), "height": np.full(n, -1),
            "boxes": np.full((n, 16, 4), np.nan)}
        out: dict[str, dict[str, np.ndarray]] = {}
        for m in methods:
            h, w = spec.raw_shapes[m]
            out[m] = {"maps": np.full((n, *T, INPUT_SIZE, INPUT_SIZE), np.nan,
                                      dtype=np.float16),
                      "raw": np.full((n, *T, h, w), np.nan, dtype=np.float32)}
            if m in spec.stderr_methods:
                out[m]["stderr"] = np.full((n, *T, h, w), np.nan, dtype=np.float32)
    else:
        stored_targets = g["images"]["target"][spec.shard_slice(shard)]
        stored_maps: dict[str, np.ndarray] = {}
    # built (fx-traced) before the compute and its decoder threads: nothing traces while
    # they run (_BUILDS)
    cams = ({m: cached_method(lm, m, method_options_for(config, m, forward)) for m in methods}
            if make_maps else {})
    random_models = (cached_randomised(lm) if score and "mprt" in config.metrics else [])
    randomised = {m: [cached_method(r, m, method_options_for(config, m, forward))
                      for r in random_models] for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    rows: dict[str, list[MetricRow]] = {m: [] for m in methods}
    evaluations, explained = 0, 0
    batches = decoded_batches(recs, image_batch(config.device, config.batch_images),
                              decode_threads(config.device, config.decode_threads))
    with _BUILDS.compute(), contextlib.closing(batches):
        for batch in batches:
            for d in batch:
                if d.error is not None:
                    failures.setdefault(d.record.image_id, d.error)
            good = [d for d in batch if d.record.image_id not in failures]
            if not good:
                continue
            x = channels_last(stack(good, lm.device), config.channels_last)
            if make_maps:
                for d in good:
                    images["width"][d.index], images["height"][d.index] = d.size
                    b = d.record.boxes_of(d.record.label)[:16]
                    images["boxes"][d.index, : len(b)] = b
                slots, bad = target_slots(config.target_spec, lm, [d.record for d in good], x,
                                          config.precision)
                for i, why in bad:  # e.g. --target present on an image without annotation
                    failures.setdefault(good[i].record.image_id, why)
                slots = [(j, pos, t) for j, (pos, t) in enumerate(slots)]
            else:  # the classes the stored maps explain
                slots = stored_slots(stored_targets[[d.index for d in good]], lm.device)
            explained += len(good)
            for j, pos, slot_targets in slots:
                sub = [good[i] for i in pos]
                at = ([d.index for d in sub], j) if T else ([d.index for d in sub],)
                x_j = x if len(sub) == len(good) else x[pos]
                examples = [(d.record, d.boxes) for d in sub]
                for m in methods:
                    kwargs = method_call_options(m, config.seed, [d.record.image_id for d in sub])
                    if make_maps:
                        t = time.perf_counter()
                        with autocast(lm.device, config.precision):
                            result = cams[m](x_j, slot_targets, **kwargs)
                        _synchronize(lm.device)
                        seconds[m] += time.perf_counter() - t
                        arrays = out[m]
                        arrays["maps"][at] = result.maps.half().cpu().numpy()
                        arrays["raw"][at] = result.raw.float().cpu().numpy()
                        if "stderr" in arrays:
                            arrays["stderr"][at] = result.extras["stderr"].float().cpu().numpy()
                            evaluations += int(result.extras["evaluations"].sum())
                        images["target"][at] = result.targets.cpu().numpy()
                        images["probability"][at] = result.probabilities.float().cpu().numpy()
                        maps, targets = stored_precision(result.maps), result.targets
                    elif score:
                        if m not in stored_maps:  # once per shard and method
                            stored_maps[m] = store.read_shard(dataset, name, m, shard)
                        maps = torch.from_numpy(stored_maps[m][at].astype(np.float32)
                                                ).to(lm.device)
                        targets = slot_targets
                    if score:
                        with autocast(lm.device, config.precision):
                            random_maps = randomised_maps(randomised.get(m, []), x_j, targets,
                                                          kwargs)
                            rows[m] += score_maps(lm.model, x_j, maps, targets, examples, m,
                                                  config.protocol, config.causal_pixels, math.nan,
                                                  seed=config.seed, pg_class=config.pg_class,
                                                  batch_size=forward, metrics=config.metrics,
                                                  randomised=random_maps)
    per_image = ({m: t / explained for m, t in seconds.items()} if make_maps and explained
                 else shard_record.get("seconds", {}))
    if make_maps:
        store.write_shard(dataset, name, shard, images, out, record={
            "failures": failures, "seconds": per_image, "shapcam_evaluations": evaluations,
            "started_at": started_at, "wall_seconds": time.perf_counter() - t0,
            "worker": worker_identity(), "thread": threading.current_thread().name,
            "forward_batch": forward, "batch_images": image_batch(config.device,
                                                                  config.batch_images),
            "rss_bytes": psutil.Process().memory_info().rss})
        written = sum(a.nbytes for arrays in out.values() for a in arrays.values())
        log.info("explain %s/%s shard %d: %d images read, %d failed%s; seconds per image: %s; "
                 "%.1f MB of maps written", dataset, name, shard, explained, len(failures),
                 f" ({_failed_list(failures)})" if failures else "",
                 ", ".join(f"{m} {t:.3f}" for m, t in per_image.items()) or "none",
                 written / 1e6)
    if score:
        run_id = store.attrs["run_id"]
        for m in methods:
            table = [{"run_id": run_id, "image_id": d["image_id"], "label": d["label"],
                      "protocol": config.protocol, "error": failures[d["image_id"]]}
                     for d in records if d["image_id"] in failures]
            secs = per_image.get(m, math.nan)
            table += [_metric_row(r, run_id, secs) for r in rows[m]]
            path = write_metrics_shard(run_dir, dataset, name, m, shard, table, config.protocol)
            log.info("evaluate %s/%s shard %d, %s (%s): %d rows, %d failed, written to %s",
                     dataset, name, shard, m, config.protocol, len(table), len(failures), path)
    return {"shard": shard, "model": name, "skipped": False, "images": n,
            "failed": len(failures), "explained": make_maps, "evaluated": score,
            "seconds": time.perf_counter() - t0}


def explain_shard(run_dir: str, config: RunConfig, model: ModelSpec, shard: int,
                  records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Only the maps of one shard (:func:`process_shard` without its metrics)."""
    return process_shard(run_dir, config, model, shard, records, evaluate=False)


def metrics_complete(run_dir: str, config: RunConfig, model: str, shard: int) -> bool:
    return all(metrics_exist(run_dir, config.dataset, model, m, shard, config.protocol)
               for m in config.methods)


def evaluate_shard(run_dir: str, config: RunConfig, model: ModelSpec, shard: int,
                   records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Only the metrics of one shard, from its stored maps (``evaluate-store``)."""
    return process_shard(run_dir, config, model, shard, records, explain=False)


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
