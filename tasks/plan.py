"""Planning a run: draw the dataset's images, create the store and one table per model, and
cut the images into shards (records travel to tasks as JSON-able dicts)."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from shapcam.data import ImageRecord, draw_records, open_dataset
from shapcam.data.datasets import OWN_DATASETS
from shapcam.data.images import location
from shapcam.errors import ShapCAMError
from shapcam.methods import METHOD_TITLES
from storage import Run, SaliencyStore, StorageError, TableSpec, write_image_index
from storage.metrics_table import shard_files
from storage.tables import metrics_parts

from .config import ModelSpec, RunConfig
from .workers import cached_method, cached_model


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
    return ImageRecord(d["image_id"], location(d["path"]), d["label"],
                       {int(c): np.asarray(b, dtype=np.float32).reshape(-1, 4)
                        for c, b in d["boxes"].items()},
                       tuple(d["size"]) if d["size"] else None, tuple(d["labels"]),
                       error=d["error"])


#: Shard tasks per model that the automatic shard size aims at, at most: each task run costs
#: Prefect and Dask 0.3-0.5 s of orchestration (benchmarks/bench_orchestration.py), so 50,000
#: ILSVRC images in shards of 8 would spend 30-50 min per model on it.
TARGET_SHARDS = 500
SHARD_SIZES = (8, 128)  # the automatic shard size stays within these (powers of 2)


def auto_shard_size(n_images: int) -> int:
    """Images per shard when ``--shard-size`` is not given: the smallest power of two from 8
    that keeps the run within :data:`TARGET_SHARDS` shards per model, at most 128 (a shard is
    also the unit of resume: the work a stop loses). 8 up to 4,000 images, 128 for ILSVRC's
    50,000."""
    lo, hi = SHARD_SIZES
    size = lo
    while size < hi and math.ceil(n_images / size) > TARGET_SHARDS:
        size *= 2
    return size


def dataset_fingerprint(paths: Sequence[str], root: str | None = None) -> str:
    """A cheap witness of the dataset: the modification time of every folder that holds an
    image of the run (adding, removing or renaming an image changes it) and of the files at
    the top of ``root`` (ILSVRC's ``LOC_val_solution.csv``). An annotation edited in place
    deeper in the dataset, or an image rewritten under the same name, is not seen."""
    stamps = []
    tops = sorted(p for p in Path(root).iterdir() if p.is_file()) if root and \
        os.path.isdir(root) else []
    for path in [*sorted({os.path.dirname(p) for p in paths}), *map(str, tops)]:
        try:
            stamps.append(f"{path}\0{os.stat(path).st_mtime_ns}")
        except OSError:
            stamps.append(f"{path}\0missing")
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:16]


def records_from_index(index: pd.DataFrame) -> list[ImageRecord]:
    """The run's records as its image index stored them (what :func:`image_index_row` wrote)."""
    out = []
    for r in index.to_dict("records"):
        boxes: dict[int, list[list[float]]] = {}
        for b in r["boxes"] if r["boxes"] is not None else []:
            boxes.setdefault(int(b["cls"]), []).append([b["xmin"], b["ymin"], b["xmax"],
                                                        b["ymax"]])
        size = None if pd.isna(r["width"]) or pd.isna(r["height"]) else (int(r["width"]),
                                                                          int(r["height"]))
        out.append(ImageRecord(r["image_id"], location(r["path"]), int(r["label"]),
                               {c: np.asarray(b, dtype=np.float32).reshape(-1, 4)
                                for c, b in boxes.items()}, size,
                               tuple(int(c) for c in _list(r["labels"])),
                               error=r["error"] if isinstance(r["error"], str) else None))
    return out


def _list(value: Any) -> Any:
    return () if value is None else value


def _stored_records(run_dir: str, config: RunConfig) -> list[ImageRecord] | None:
    """The records of a resumed run from its image index, when the dataset is the one it was
    planned from (same root, folders unchanged: :func:`dataset_fingerprint`); else None."""
    store = SaliencyStore(run_dir)
    if not store.location.exists("maps.zarr", "zarr.json"):
        return None
    attrs = store.attrs
    stored = RunConfig.from_dict(attrs["config"])
    if stored.root != config.root or "dataset_fingerprint" not in attrs:
        return None
    try:
        records = records_from_index(Run(run_dir).image_index(config.dataset))
    except StorageError:
        return None
    if dataset_fingerprint([str(r.path) for r in records], config.root) != \
            attrs["dataset_fingerprint"]:
        return None
    return records


def _check_same_images(store: SaliencyStore, config: RunConfig,
                       records: list[ImageRecord]) -> None:
    """A run read anew from its dataset (moved, or its folders changed) must draw the same
    images as the tables hold."""
    ids = [r.image_id for r in records]
    for spec in config.models:
        try:
            _, g = store.table(config.dataset, spec.name)
        except StorageError:  # not made yet
            continue
        had = g["images"]["image_id"][:].tolist()
        if had != ids:
            gone = sorted(set(had) - set(ids))[:3]
            new = sorted(set(ids) - set(had))[:3]
            raise ShapCAMError(
                f"the dataset {config.dataset} (--root {config.root}) now gives other images "
                f"than run {store.attrs.get('run_id')} holds ({len(had)} then, {len(ids)} now;"
                f" gone: {gone or 'none'}, new: {new or 'none'}): resume with the dataset as "
                "it was, or start a new --run-id")


def read_dataset(config: RunConfig) -> list[ImageRecord]:
    """The images of ``config``'s dataset, drawn (``n_images``, ``seed``). Labels given by
    name (your folder or manifest, COCO categories) map to the first model's classes."""
    categories = None
    if config.dataset in OWN_DATASETS or config.boxes:
        categories = cached_model(config.models[0], "cpu").categories
    return draw_records(open_dataset(config.dataset, config.root, config.split,
                                     categories=categories, boxes=config.boxes,
                                     class_map=config.class_map), config.n_images, config.seed)


def plan_run(run_dir: str, run_id: str, config: RunConfig) -> dict[str, Any]:
    """Draw the images, create the store and one table per model; return the shard plan.

    A store that exists already must have been made with the same map options (resume); a
    resumed run reads its images from its own image index, not from the dataset (unless the
    dataset's folders changed: then it reads them anew and they must be the same images).
    """
    stored = _stored_records(run_dir, config)
    records = stored if stored is not None else read_dataset(config)
    if not records:
        raise ShapCAMError(f"dataset {config.dataset} has no images")
    store = SaliencyStore.create(run_dir, run_id, {
        "config": config.to_dict(), "config_hash": config.hash(),
        "method_titles": {m: METHOD_TITLES[m] for m in config.methods},
        "versions": {"torch": torch.__version__, "numpy": np.__version__}})
    stored_config = RunConfig.from_dict(store.attrs["config"])
    changed = stored_config.changed_map_options(config)
    if changed:
        was = ", ".join(f"{k}={stored_config.map_options()[k]!r}" for k in changed)
        raise ShapCAMError(f"run {run_id} in {run_dir} was made with other options ({was}); "
                           "resume it with the same options, or start a new --run-id")
    if stored is None:
        _check_same_images(store, config, records)
        write_image_index(run_dir, config.dataset, [image_index_row(r) for r in records])
        store.update_attrs({"dataset_fingerprint": dataset_fingerprint(
            [str(r.path) for r in records], config.root)})
    S = config.shard_size or auto_shard_size(len(records))
    for spec in config.models:
        _init_table(store, config, spec, records, S)
    S = store.table(config.dataset, config.models[0].name)[0].shard_size
    shards = [[record_to_dict(r) for r in records[k:k + S]] for k in range(0, len(records), S)]
    return {"run_dir": run_dir, "shards": shards, "n_images": len(records)}


def _init_table(store: SaliencyStore, config: RunConfig, spec: ModelSpec,
                records: list[ImageRecord], shard_size: int) -> None:
    """Create the table of ``spec`` (its model is loaded only when the table is new)."""
    try:
        store.table(config.dataset, spec.name)
        return  # made by an earlier attempt (its layout was written last)
    except StorageError:
        pass
    lm = cached_model(spec, "cpu")
    frame = (lm.input_size, lm.input_size)  # maps, boxes and metrics live in the model's frame
    raw_shapes = {}
    for m in config.methods:
        cam = cached_method(lm, m, config.options_for(m))
        raw_shapes[m] = tuple(cam.raw_shape(cam.feature_hw(frame), frame))
    store.init_table(config.dataset, spec.name, [r.image_id for r in records],
                     [r.label for r in records],
                     TableSpec.compact(len(records), shard_size, frame, raw_shapes,
                                       n_targets=config.target_spec.slots(records)),
                     {"weights": lm.weights, "target_layer": lm.target_layer,
                      "method_options": config.method_options, "input_size": lm.input_size,
                      "categories": list(lm.categories)})


def complete_shards(run_dir: str, config: RunConfig, n_shards: int, *, explain: bool = True
                    ) -> set[tuple[str, int]]:
    """``(model, shard)`` pairs with nothing left to do: maps stored (unless ``explain`` is
    False) and every method's metrics of ``config.protocol`` written. One listing of the
    completion records and one of the metrics files, whatever the number of shards."""
    store = SaliencyStore(run_dir)
    files = shard_files(store.location, sizes=False).get(config.protocol, {})
    done = set()
    for spec in config.models:
        status = store.shard_status(config.dataset, spec.name) if explain else {}
        for k in range(n_shards):
            if explain and not status.get(k):
                continue
            if all("/".join(metrics_parts(config.dataset, spec.name, m, k, config.protocol))
                   in files for m in config.methods):
                done.add((spec.name, k))
    return done
