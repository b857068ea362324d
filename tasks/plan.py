"""Planning a run: draw the dataset's images, create the store and one table per model, and
cut the images into shards (records travel to tasks as JSON-able dicts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from shapcam.data import ImageRecord, draw_records, open_dataset
from shapcam.errors import ShapCAMError
from shapcam.methods import METHOD_TITLES
from shapcam.zoo.preprocessing import INPUT_SIZE
from storage import SaliencyStore, TableSpec, write_image_index

from .config import RunConfig
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
