"""One shard of one model, the unit every image of every run passes through.

:func:`process_shard` is a short pipeline of named steps over the shard's decoded batches:

    decode (batches)  ->  maps of each class slot and method  ->  score  ->  write

The maps come from one of two sources, and scoring is optional, so the three modes are
compositions rather than flags:

- explain:                 :class:`ComputedMaps`, no scorer (``explain_shard``)
- explain and evaluate:    :class:`ComputedMaps` + :class:`Scorer` (``process_shard``)
- evaluate stored maps:    :class:`StoredMaps` + :class:`Scorer` (``evaluate_shard``)

Whatever is complete already is skipped: maps stored by an earlier attempt are read back for
the metrics, so a resumed shard never recomputes them. Metrics are computed from the maps at
the store's precision (float16), so they are the same whether the maps come from this call or
from the store.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import psutil
import torch

from shapcam.data.stream import Decoded, decode_threads, decoded_batches, image_batch, stack
from shapcam.errors import ShapCAMError
from shapcam.evaluation.evaluate import (
    MetricRow,
    method_call_options,
    randomised_maps,
    score_maps,
    stored_precision,
    target_slots,
)
from shapcam.evaluation.field_metrics import FIELD_METRICS
from shapcam.runtime.precision import autocast, channels_last
from shapcam.zoo.models import LoadedModel
from storage import SaliencyStore, TableSpec, write_metrics_shard
from storage.tables import metrics_exist

from .config import ModelSpec, RunConfig
from .plan import record_from_dict
from .workers import (
    BUILDS,
    cached_method,
    cached_model,
    cached_randomised,
    forward_batch_for,
    log,
    method_options_for,
    set_threads,
    synchronize,
    worker_identity,
)

_METRIC_COLUMNS = ("image_id", "target", "label", "protocol", "y", "o", "avg_drop", "increase",
                   "proportion", "pointing", "deletion", "insertion", "seconds",
                   *(c for cols in FIELD_METRICS.values() for c in cols))


@dataclass
class ShardJob:
    """What every step of one shard reads: the run, the model, the store's table."""

    run_dir: str
    config: RunConfig
    model: ModelSpec
    index: int
    records: Sequence[dict[str, Any]]
    store: SaliencyStore
    spec: TableSpec
    group: Any  # the model's Zarr group
    lm: LoadedModel
    forward: int | None  # images per forward of the perturbation methods and metrics
    failures: dict[str, str] = field(default_factory=dict)  # image id -> why
    explained: int = 0  # images that reached the methods
    t0: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)

    @property
    def dataset(self) -> str:
        return self.config.dataset

    @property
    def name(self) -> str:
        return self.model.name

    def options(self, method: str) -> dict[str, Any]:
        return method_options_for(self.config, method, self.forward)

    @property
    def size(self) -> int:
        """Side of the input frame: the table's (the model's input size when it was made)."""
        return self.spec.map_shape[0]


@dataclass
class Slot:
    """The images of a batch explained for their ``j``-th class (one slot of the class axis)."""

    j: int
    images: list[Decoded]
    x: torch.Tensor
    targets: torch.Tensor | None  # None: each method explains the predicted class
    at: tuple[Any, ...]  # where the images' rows are in the shard's arrays

    def call_options(self, method: str, seed: int) -> dict[str, Any]:
        return method_call_options(method, seed, [d.record.image_id for d in self.images])


class MapSource(Protocol):
    def slots(self, good: list[Decoded], x: torch.Tensor) -> list[Slot]: ...

    def maps(self, slot: Slot, method: str) -> tuple[torch.Tensor, torch.Tensor]: ...

    def finish(self) -> dict[str, float]: ...


def _slot(job: ShardJob, j: int, good: list[Decoded], x: torch.Tensor, pos: list[int],
          targets: torch.Tensor | None) -> Slot:
    sub = [good[i] for i in pos]
    rows = [d.index for d in sub]
    return Slot(j, sub, x if len(sub) == len(good) else x[pos], targets,
                (rows, j) if job.spec.per_image else (rows,))


class ComputedMaps:
    """Maps computed by the methods, kept in the shard's arrays and written at the end."""

    def __init__(self, job: ShardJob) -> None:
        self.job = job
        n, T, methods = len(job.records), job.spec.per_image, job.config.methods
        self.images: dict[str, np.ndarray] = {
            "target": np.full((n, *T), -1), "probability": np.full((n, *T), np.nan),
            "width": np.full(n, -1), "height": np.full(n, -1),
            "boxes": np.full((n, 16, 4), np.nan)}
        self.out: dict[str, dict[str, np.ndarray]] = {}
        for m in methods:
            h, w = job.spec.raw_shapes[m]
            self.out[m] = {"raw": np.full((n, *T, h, w), np.nan, dtype=np.float32)}
            if m not in job.spec.derived:  # the others' maps are derived from raw on read
                self.out[m]["maps"] = np.full((n, *T, *job.spec.map_shape), np.nan,
                                              dtype=np.float16)
            if m in job.spec.stderr_methods:
                self.out[m]["stderr"] = np.full((n, *T, h, w), np.nan, dtype=np.float32)
        # built (fx-traced) before the compute and its decoder threads: nothing traces while
        # they run (BUILDS)
        self.cams = {m: cached_method(job.lm, m, job.options(m)) for m in methods}
        self.seconds = dict.fromkeys(methods, 0.0)
        self.evaluations = 0

    def slots(self, good: list[Decoded], x: torch.Tensor) -> list[Slot]:
        job = self.job
        for d in good:
            self.images["width"][d.index], self.images["height"][d.index] = d.size
            b = d.record.boxes_of(d.record.label)[:16]
            self.images["boxes"][d.index, : len(b)] = b
        slots, bad = target_slots(job.config.target_spec, job.lm, [d.record for d in good], x,
                                  job.config.precision)
        for i, why in bad:  # e.g. --target present on an image without annotation
            job.failures.setdefault(good[i].record.image_id, why)
        return [_slot(job, j, good, x, pos, t) for j, (pos, t) in enumerate(slots)]

    def maps(self, slot: Slot, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        job, arrays, at = self.job, self.out[method], slot.at
        t = time.perf_counter()
        with autocast(job.lm.device, job.config.precision):
            result = self.cams[method](slot.x, slot.targets,
                                       **slot.call_options(method, job.config.seed))
        synchronize(job.lm.device)
        self.seconds[method] += time.perf_counter() - t
        if "maps" in arrays:
            arrays["maps"][at] = result.maps.half().cpu().numpy()
        arrays["raw"][at] = result.raw.float().cpu().numpy()
        if "stderr" in arrays:
            arrays["stderr"][at] = result.extras["stderr"].float().cpu().numpy()
            self.evaluations += int(result.extras["evaluations"].sum())
        self.images["target"][at] = result.targets.cpu().numpy()
        self.images["probability"][at] = result.probabilities.float().cpu().numpy()
        return stored_precision(result.maps), result.targets

    def finish(self) -> dict[str, float]:
        """Write the shard's arrays and its completion record; seconds per image."""
        job = self.job
        per_image = ({m: t / job.explained for m, t in self.seconds.items()} if job.explained
                     else {})
        job.store.write_shard(job.dataset, job.name, job.index, self.images, self.out, record={
            "failures": job.failures, "seconds": per_image,
            "shapcam_evaluations": self.evaluations, "started_at": job.started_at,
            "wall_seconds": time.perf_counter() - job.t0, "worker": worker_identity(),
            "thread": threading.current_thread().name, "forward_batch": job.forward,
            "batch_images": image_batch(job.config.device, job.config.batch_images),
            "rss_bytes": psutil.Process().memory_info().rss})
        written = sum(a.nbytes for arrays in self.out.values() for a in arrays.values())
        log.info("explain %s/%s shard %d: %d images read, %d failed%s; seconds per image: %s; "
                 "%.1f MB of maps written", job.dataset, job.name, job.index, job.explained,
                 len(job.failures),
                 f" ({_failed_list(job.failures)})" if job.failures else "",
                 ", ".join(f"{m} {t:.3f}" for m, t in per_image.items()) or "none",
                 written / 1e6)
        return per_image


class StoredMaps:
    """The maps of a completed shard, read back from the store (once per method)."""

    def __init__(self, job: ShardJob) -> None:
        self.job = job
        self.record = job.store.shard_record(job.dataset, job.name, job.index)
        job.failures.update(self.record.get("failures", {}))
        self.targets = job.group["images"]["target"][job.spec.shard_slice(job.index)]
        self.stored: dict[str, np.ndarray] = {}

    def slots(self, good: list[Decoded], x: torch.Tensor) -> list[Slot]:
        """The classes the stored maps explain."""
        grid = self.targets[[d.index for d in good]].reshape(len(good), -1)
        out = []
        for j in range(grid.shape[1]):
            pos = np.flatnonzero(grid[:, j] >= 0).tolist()
            if pos:
                classes = torch.from_numpy(grid[pos, j].astype(np.int64)).to(self.job.lm.device)
                out.append(_slot(self.job, j, good, x, pos, classes))
        return out

    def maps(self, slot: Slot, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        job = self.job
        if method not in self.stored:
            self.stored[method] = job.store.read_shard(job.dataset, job.name, method, job.index)
        maps = torch.from_numpy(self.stored[method][slot.at].astype(np.float32))
        return maps.to(job.lm.device), slot.targets

    def finish(self) -> dict[str, float]:
        return self.record.get("seconds", {})


class Scorer:
    """The metrics of each slot's maps, written as one Parquet file per method."""

    def __init__(self, job: ShardJob) -> None:
        self.job = job
        config = job.config
        random_models = cached_randomised(job.lm) if "mprt" in config.metrics else []
        self.randomised = {m: [cached_method(r, m, job.options(m)) for r in random_models]
                           for m in config.methods}
        self.rows: dict[str, list[MetricRow]] = {m: [] for m in config.methods}

    def add(self, slot: Slot, method: str, maps: torch.Tensor, targets: torch.Tensor) -> None:
        job, config = self.job, self.job.config
        examples = [(d.record, d.boxes) for d in slot.images]
        with autocast(job.lm.device, config.precision):
            random_maps = randomised_maps(self.randomised[method], slot.x, targets,
                                          slot.call_options(method, config.seed))
            self.rows[method] += score_maps(
                job.lm.model, slot.x, maps, targets, examples, method, config.protocol,
                config.causal_pixels_at(job.size), math.nan, seed=config.seed,
                pg_class=config.pg_class, batch_size=job.forward, metrics=config.metrics,
                randomised=random_maps)

    def write(self, per_image: dict[str, float]) -> None:
        job, protocol = self.job, self.job.config.protocol
        run_id = job.store.attrs["run_id"]
        for m in job.config.methods:
            table = [{"run_id": run_id, "image_id": d["image_id"], "label": d["label"],
                      "protocol": protocol, "error": job.failures[d["image_id"]]}
                     for d in job.records if d["image_id"] in job.failures]
            secs = per_image.get(m, math.nan)
            table += [_metric_row(r, run_id, secs) for r in self.rows[m]]
            path = write_metrics_shard(job.run_dir, job.dataset, job.name, m, job.index, table,
                                       protocol)
            log.info("evaluate %s/%s shard %d, %s (%s): %d rows, %d failed, written to %s",
                     job.dataset, job.name, job.index, m, protocol, len(table),
                     len(job.failures), path)


def good_batches(job: ShardJob) -> Iterator[tuple[list[Decoded], torch.Tensor]]:
    """The shard's images decoded in compute batches (decoded ahead on threads), without
    the ones that failed (recorded in ``job.failures``), and stacked on the model's device."""
    config = job.config
    batches = decoded_batches([record_from_dict(d) for d in job.records],
                              image_batch(config.device, config.batch_images),
                              decode_threads(config.device, config.decode_threads), size=job.size)
    with contextlib.closing(batches):
        for batch in batches:
            for d in batch:
                if d.error is not None:
                    job.failures.setdefault(d.record.image_id, d.error)
            good = [d for d in batch if d.record.image_id not in job.failures]
            if good:
                yield good, channels_last(stack(good, job.lm.device), config.channels_last)


def run_batches(job: ShardJob, source: MapSource, scorer: Scorer | None) -> None:
    """Every slot of every batch through every method: maps from ``source``, then scored."""
    with BUILDS.compute():
        for good, x in good_batches(job):
            slots = source.slots(good, x)
            job.explained += len(good)
            for slot, m in itertools.product(slots, job.config.methods):
                maps, targets = source.maps(slot, m)
                if scorer is not None:
                    scorer.add(slot, m, maps, targets)


def open_job(run_dir: str, config: RunConfig, model: ModelSpec, shard: int,
             records: Sequence[dict[str, Any]], store: SaliencyStore) -> ShardJob:
    t0, started_at = time.perf_counter(), time.time()
    set_threads(config)
    lm = cached_model(model, config.device, config.channels_last)
    spec, group = store.table(config.dataset, model.name)
    if spec.map_shape != (lm.input_size, lm.input_size):
        raise ShapCAMError(f"{model.name} now takes {lm.input_size} x {lm.input_size} inputs; "
                           f"its table in {run_dir} was made at {spec.map_shape[0]} x "
                           f"{spec.map_shape[1]}: pass --input-size {spec.map_shape[0]} or "
                           "start a new --run-id")
    return ShardJob(run_dir, config, model, shard, records, store, spec, group, lm,
                    forward_batch_for(lm, config), t0=t0, started_at=started_at)


def process_shard(run_dir: str, config: RunConfig, model: ModelSpec, shard: int,
                  records: Sequence[dict[str, Any]], *, explain: bool = True,
                  evaluate: bool = True) -> dict[str, Any]:
    """Explain one shard into the store and/or evaluate it into Parquet, reading and decoding
    each image once (compute batches of ``config.batch_images``, decoded ahead on
    ``config.decode_threads`` threads). What is complete already is skipped."""
    store = SaliencyStore(run_dir)
    have_maps = store.completed(config.dataset, model.name, shard)
    make_maps = explain and not have_maps
    score = evaluate and not metrics_complete(run_dir, config, model.name, shard)
    if not (make_maps or score):
        log.info("%s/%s shard %d: already complete, skipped", config.dataset, model.name, shard)
        return {"shard": shard, "model": model.name, "skipped": True}
    if score and not (have_maps or make_maps):
        raise ShapCAMError(f"shard {shard} of {model.name} has no maps yet: run the explain "
                           "step (shapcam run with the same --run-id) first")
    job = open_job(run_dir, config, model, shard, records, store)
    source: MapSource = ComputedMaps(job) if make_maps else StoredMaps(job)
    scorer = Scorer(job) if score else None
    run_batches(job, source, scorer)
    per_image = source.finish()
    if scorer is not None:
        scorer.write(per_image)
    return {"shard": shard, "model": model.name, "skipped": False, "images": len(records),
            "failed": len(job.failures), "explained": make_maps, "evaluated": score,
            "seconds": time.perf_counter() - job.t0}


def explain_shard(run_dir: str, config: RunConfig, model: ModelSpec, shard: int,
                  records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Only the maps of one shard (:func:`process_shard` without its metrics)."""
    return process_shard(run_dir, config, model, shard, records, evaluate=False)


def evaluate_shard(run_dir: str, config: RunConfig, model: ModelSpec, shard: int,
                   records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Only the metrics of one shard, from its stored maps (``evaluate-store``)."""
    return process_shard(run_dir, config, model, shard, records, explain=False)


def metrics_complete(run_dir: str, config: RunConfig, model: str, shard: int) -> bool:
    return all(metrics_exist(run_dir, config.dataset, model, m, shard, config.protocol)
               for m in config.methods)


def _metric_row(r: MetricRow, run_id: str, seconds: float) -> dict[str, Any]:
    row = {k: getattr(r, k) for k in _METRIC_COLUMNS} | {"seconds": seconds}
    # Not applicable is NULL in the tables (SQL aggregates skip it; NaN would not).
    return {k: None if isinstance(v, float) and math.isnan(v) and k != "seconds" else v
            for k, v in row.items()} | {"run_id": run_id, "evaluations": None}


def _failed_list(failures: dict[str, str], shown: int = 3) -> str:
    items = [f"{k}: {v}" for k, v in list(failures.items())[:shown]]
    return "; ".join(items) + (f"; and {len(failures) - shown} more" if len(failures) > shown
                               else "")
