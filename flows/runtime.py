"""What ``shapcam run`` and a scheduled deployment share: the run config and the task runner."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shapcam.cli import method_settings
from shapcam.metrics import VARIANTS
from shapcam.models import ShapCAMError
from shapcam.presets import resolve_preset

ALL_METHODS = "mask,rise,gradcam,gradcampp,scorecam,shapcam"
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))


def run_config(*, dataset: str = "sample", root: str | None = None, split: str = "test",
               models: str = "mobilenet_v2:IMAGENET1K_V1", methods: str = ALL_METHODS,
               n_images: int | None = None, shard_size: int = 8, seed: int = 0,
               protocol: str = "scorecam", causal: bool = True, preset: str = "paper",
               settings: list[str] | None = None, device: str = "cpu",
               threads: int = 1) -> dict[str, Any]:
    """The ``explain-dataset`` config from command-line style options (validated)."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if protocol not in VARIANTS:
        raise ShapCAMError(f"unknown protocol {protocol!r}; use one of {', '.join(VARIANTS)}")
    if shard_size < 1:
        raise ShapCAMError(f"--shard-size must be >= 1, got {shard_size}")
    per_method, step = resolve_preset(preset, names, method_settings(settings or [], names))
    model_specs = []
    for item in models.split(","):
        name, _, weights = item.strip().partition(":")
        model_specs.append({"name": name, "weights": weights or "DEFAULT", "layer": None})
    return {"dataset": dataset, "root": str(root) if root else None, "split": split,
            "n_images": n_images, "seed": seed, "shard_size": shard_size,
            "models": model_specs, "methods": names, "method_options": per_method,
            "protocol": protocol, "causal": causal, "causal_step": step, "preset": preset,
            "device": device, "torch_threads": threads}


def new_run_id(when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")


def run_dir_for(store: str, run_id: str) -> str:
    """``store/run_id`` for a folder (made absolute: Dask workers may run elsewhere) or URL."""
    return (f"{store.rstrip('/')}/{run_id}" if "://" in store
            else str((Path(store) / run_id).resolve()))


def task_runner(dask_address: str | None, workers: int, threads: int):
    """prefect-dask's runner: an existing scheduler, or a local cluster of worker processes
    with ``threads`` torch threads each (one task at a time per worker)."""
    import dask
    from prefect_dask import DaskTaskRunner

    # A spilling worker keeps a `storage/` folder in its local directory, which Dask puts on
    # sys.path: with an editable install it would shadow this project's `storage` package as a
    # namespace package. Tasks return small summaries, so there is nothing worth spilling.
    dask.config.set({"distributed.worker.memory.spill": False,
                     "distributed.worker.memory.target": False})
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True,
        "dashboard_address": ":0",
        "env": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}})
