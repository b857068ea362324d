"""What a Dask worker keeps between shard tasks: the loaded models, their built methods and
MPRT copies, the measured GPU batch, and the lock that keeps ``torch.fx`` builds apart from
computes (:class:`BuildsAlone`). Caches are per worker process and per thread."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import torch

from shapcam.evaluation.evaluate import randomised_models
from shapcam.methods import CAMMethod, build_method
from shapcam.runtime.cpu import tune_allocator
from shapcam.runtime.precision import measured_gpu_batch, to_channels_last
from shapcam.zoo.models import LoadedModel, load_model

from .config import ModelSpec, RunConfig

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


BUILDS = BuildsAlone()
_MODELS: dict[tuple[Any, ...], LoadedModel] = {}  # per (spec, device, layout, thread)
_METHODS: dict[tuple[Any, ...], CAMMethod] = {}
_RANDOMISED: dict[int, list[LoadedModel]] = {}  # MPRT copies per loaded model


def cached_model(spec: ModelSpec, device: str, nhwc: bool = False) -> LoadedModel:
    """Load a model once per worker thread and reuse it across tasks (``nhwc``: in the
    channels-last memory format). Per thread, so tasks running at once on one worker
    (``--tasks-per-gpu``) share no model and no method built on it: the fallback split hooks
    the model's modules for the length of a call."""
    key = (spec.name, spec.weights, spec.layer, spec.input_size, device, nhwc,
           threading.get_ident())
    if key not in _MODELS:
        if device.startswith("cpu"):
            tune_allocator()  # worker processes: keep freed activations for reuse
        with BUILDS.build():  # finding the default layer runs the model
            lm = load_model(spec.name, spec.weights, target_layer=spec.layer, device=device,
                            input_size=spec.input_size)
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
        with BUILDS.build():  # a probe forward
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
        with BUILDS.build():
            _RANDOMISED[id(lm)] = randomised_models(lm)
    return _RANDOMISED[id(lm)]


def cached_method(lm: LoadedModel, name: str, options: dict[str, Any]) -> CAMMethod:
    key = (id(lm), name, json.dumps(options, sort_keys=True))
    if key not in _METHODS:
        with BUILDS.build():  # traces the model
            _METHODS[key] = build_method(name, lm, options)
    return _METHODS[key]


def set_threads(config: RunConfig) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)


def worker_identity() -> str:
    """The Dask worker running this task (its address), else ``host:pid``."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
