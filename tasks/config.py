"""The typed configuration of every pipeline run: :class:`RunConfig` (explain-dataset),
:class:`DistillSpec` (paper Table 4) and :class:`FinetuneSpec` (VOC2007).

Every default is stated here once. ``to_dict`` / ``from_dict`` convert to the JSON that travels as
Prefect parameters and is stored in a run's attributes; ``from_dict`` also reads the key names of
stores written before this module existed (``torch_threads``, ``orders``). Validation happens
in ``__post_init__``, so a config that exists is a valid one: the command line, a deployment
and a resumed run all fail at the same place with the same message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shapcam.data import DATASETS
from shapcam.errors import ShapCAMError
from shapcam.evaluation.evaluate import PG_CLASSES
from shapcam.evaluation.field_metrics import check_metrics
from shapcam.evaluation.metrics import VARIANTS, step_in_frame
from shapcam.evaluation.targets import TargetSpec
from shapcam.methods import METHODS, check_options, method_class
from shapcam.runtime.precision import check_precision
from shapcam.runtime.presets import resolve_preset

from .model_spec import DEFAULT_MODEL, DEFAULT_WEIGHTS, FACTORY_WEIGHTS, ModelSpec

#: The paper's methods in its column order (the default of ``--methods``).
ALL_METHODS: tuple[str, ...] = tuple(METHODS)
__all__ = ["ALL_METHODS", "DEFAULT_MODEL", "DEFAULT_WEIGHTS", "FACTORY_WEIGHTS", "DistillSpec",
           "FinetuneSpec", "ModelSpec", "RunConfig", "device_resources", "parse_resources",
           "parse_settings"]
#: Key names of older stores -> today's.
_RENAMED = {"torch_threads": "threads", "orders": "permutations"}


def parse_settings(items: list[str] | None, methods: list[str] | tuple[str, ...]
                   ) -> dict[str, dict[str, Any]]:
    """``--set METHOD.KEY=VALUE`` (repeatable) -> ``{method: {key: typed value}}``.

    ``KEY=VALUE`` is accepted as a short form when ``methods`` holds exactly one method. Values
    become int, float or bool when they read as one; each key is checked against the method's
    options.
    """
    per_method: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ShapCAMError(f"--set expects METHOD.KEY=VALUE, got {item!r} "
                               "(e.g. --set rise.n_masks=500)")
        method, dot, option = key.rpartition(".")
        if not dot and len(methods) == 1:
            method = methods[0]
        if method not in methods:
            raise ShapCAMError(f"--set {key}: use METHOD.KEY=VALUE with METHOD one of "
                               f"{', '.join(methods)}")
        option = option.replace("-", "_")
        value = _typed(raw)
        check_options(method, {option: value})
        per_method.setdefault(method, {})[option] = value
    return per_method


#: Shard tasks in flight per GPU by default: while one computes, the other decodes its images,
#: writes its shard and reports to Prefect, so the GPU does not wait for those between shards.
TASKS_PER_GPU = 2


def device_resources(device: str, tasks_per_gpu: int = 1) -> dict[str, float]:
    """The Dask resources a task on ``device`` asks for by default: with CUDA, a
    ``1 / tasks_per_gpu`` share of one GPU (a worker offering ``GPU=1`` runs that many at
    once when it has the threads)."""
    return {"GPU": 1 / tasks_per_gpu} if device.startswith("cuda") else {}


def parse_resources(text: str | None) -> dict[str, float] | None:
    """``--task-resources``: ``NAME=AMOUNT[,NAME=AMOUNT]`` (e.g. ``GPU=1``), ``none`` for no
    resource at all; None (not given) keeps the per-device default."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return {}
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or value <= 0:
            raise ShapCAMError(f"--task-resources: {item!r} is not NAME=AMOUNT with AMOUNT > 0; "
                               "use e.g. GPU=1, or none")
        out[name.strip()] = int(value) if value.is_integer() else value
    return out


def _typed(raw: str) -> Any:
    if raw in ("true", "false"):
        return raw == "true"
    if raw in ("none", "None"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            continue
    return raw


def _location(value: Any) -> str | None:
    """A path option as stored: absolute for a local path, as given for a URL."""
    if value is None:
        return None
    return str(value) if "://" in str(value) else str(Path(value).resolve())


def _known(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """``data`` with renamed keys updated; an unknown key is an error naming it."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {_RENAMED.get(k, k): v for k, v in data.items()}
    unknown = sorted(set(out) - names)
    if unknown:
        raise ShapCAMError(f"{what}: unknown key(s) {', '.join(unknown)}; known: "
                           f"{', '.join(sorted(names))}")
    return out


@dataclass(frozen=True)
class RunConfig:
    """What an explain-dataset run computes and how (see ``docs/orchestration.md``).

    ``method_options`` are the resolved per-method options (the preset's, then ``--set``'s);
    ``causal_step`` is the deletion/insertion step in pixels (the preset's).
    """

    dataset: str = "sample"
    root: str | None = None  # a folder, a manifest file, or an fsspec URL of either
    split: str = "test"
    boxes: str | None = None  # a COCO instances file annotating the images
    class_map: str | None = None  # JSON {name: class index or name} for folder/manifest labels
    n_images: int | None = None
    seed: int = 0
    shard_size: int | None = None  # None: from the number of images (tasks.plan.auto_shard_size)
    models: tuple[ModelSpec, ...] = (ModelSpec(),)
    methods: tuple[str, ...] = ALL_METHODS
    preset: str = "paper"
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    protocol: str = "scorecam"
    causal: bool = True
    causal_step: int = 224
    #: Field metrics (shapcam.evaluation.field_metrics.FIELD_METRICS) next to the paper's.
    metrics: tuple[str, ...] = ()
    #: Classes explained per image (shapcam.evaluation.targets): predicted, label, topk:K, present.
    target: str = "predicted"
    pg_class: str = "target"  # whose box the pointing game uses: "target" (paper) or "label"
    device: str = "cpu"
    threads: int | None = None  # torch threads per task; None: leave the process's setting
    batch_images: int | None = None  # images per compute batch; None: per device (8 / 64)
    decode_threads: int | None = None  # decoders ahead of the compute; None: per device
    #: Dask resources each task asks for; None: ``GPU=1/tasks_per_gpu`` with CUDA, nothing on
    #: CPU.
    resources: dict[str, float] | None = None
    resource_wait: float = 60.0  # seconds to wait for a worker offering ``resources``
    tasks_per_gpu: int = TASKS_PER_GPU  # shard tasks in flight per GPU (CUDA only)
    precision: str = "fp32"  # autocast of forwards/backwards: fp32 (exact), bf16, fp16
    channels_last: bool = False  # NHWC weights and inputs (cuDNN tensor cores)
    forward_batch: int | None = None  # images per forward of perturbations/metrics; None:
    # 4 on CPU, from free memory on GPU (shapcam.runtime.precision.measured_gpu_batch)

    #: The options that decide the maps (and the pointing game's class, which decides stored
    #: per-image metrics): a resumed run must match them.
    MAP_KEYS = ("dataset", "split", "n_images", "seed", "shard_size", "models", "methods",
                "method_options", "pg_class", "precision", "metrics", "target", "boxes",
                "class_map")

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(
            m if isinstance(m, ModelSpec) else ModelSpec(**m) for m in self.models))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "metrics", check_metrics(
            [m.strip() for m in self.metrics.split(",") if m.strip()]
            if isinstance(self.metrics, str) else list(self.metrics)))
        if self.dataset not in DATASETS:
            raise ShapCAMError(f"unknown dataset {self.dataset!r}; use one of "
                               f"{', '.join(DATASETS)}")
        if self.protocol not in VARIANTS:
            raise ShapCAMError(f"unknown protocol {self.protocol!r}; use one of "
                               f"{', '.join(VARIANTS)}")
        if self.pg_class not in PG_CLASSES:
            raise ShapCAMError(f"unknown --pg-class {self.pg_class!r}; use one of "
                               f"{', '.join(PG_CLASSES)}")
        if self.shard_size is not None and self.shard_size < 1:
            raise ShapCAMError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.n_images is not None and self.n_images < 1:
            raise ShapCAMError(f"--n-images must be >= 1, got {self.n_images}")
        if self.threads is not None and self.threads < 1:
            raise ShapCAMError(f"--threads must be >= 1, got {self.threads}")
        if self.batch_images is not None and self.batch_images < 1:
            raise ShapCAMError(f"--batch-images must be >= 1, got {self.batch_images}")
        check_precision(self.precision)
        TargetSpec.parse(self.target)  # an unknown --target is one line
        if self.tasks_per_gpu < 1:
            raise ShapCAMError(f"--tasks-per-gpu must be >= 1, got {self.tasks_per_gpu}")
        if self.forward_batch is not None and self.forward_batch < 1:
            raise ShapCAMError(f"--forward-batch must be >= 1, got {self.forward_batch}")
        if self.decode_threads is not None and self.decode_threads < 0:
            raise ShapCAMError(f"--decode-threads must be >= 0, got {self.decode_threads}")
        for k, v in (self.resources or {}).items():
            if not k or not isinstance(v, int | float) or v <= 0:
                raise ShapCAMError(f"--task-resources: {k}={v!r} is not NAME=AMOUNT with "
                                   "AMOUNT > 0 (e.g. GPU=1)")
        if not self.methods or not self.models:
            raise ShapCAMError("a run needs at least one method and one model")
        for what, names in (("--methods", self.methods),
                            ("--models", [m.name for m in self.models])):
            twice = sorted({n for n in names if list(names).count(n) > 1})
            if twice:  # each would write its rows twice
                raise ShapCAMError(f"{what} lists {', '.join(twice)} more than once; list "
                                   "each once")
        for m in self.methods:
            method_class(m)  # an unknown name is an error listing the registry
        for m, options in self.method_options.items():
            if m not in self.methods:
                raise ShapCAMError(f"options for {m}, which this run does not compute")
            check_options(m, options)

    @classmethod
    def build(cls, *, methods: str | tuple[str, ...] = ALL_METHODS,
              models: str | tuple[ModelSpec, ...] = (ModelSpec(),), preset: str = "paper",
              settings: list[str] | None = None, root: Any = None,
              input_size: int | None = None, boxes: Any = None, class_map: Any = None,
              **fields: Any) -> RunConfig:
        """From command-line style values: comma-separated ``methods`` and ``models``
        (``NAME[:WEIGHTS]``), a ``preset`` name, ``--set METHOD.KEY=VALUE`` items and
        ``--input-size`` (every model's)."""
        names = tuple(m.strip() for m in methods.split(",") if m.strip()) if isinstance(
            methods, str) else tuple(methods)
        specs = tuple(ModelSpec.parse(t, input_size) for t in models.split(",")) if isinstance(
            models, str) else tuple(models)
        for m in names:  # before --set, so an unknown method is named as such
            method_class(m)
        options, step = resolve_preset(preset, list(names), parse_settings(settings, names))
        return cls(methods=names, models=specs, preset=preset, method_options=options,
                   causal_step=step, root=_location(root), boxes=_location(boxes),
                   class_map=_location(class_map), **fields)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: Prefect parameters and the store's ``config`` attribute."""
        d = dataclasses.asdict(self)
        # input_size only when set: configs (and their hashes) of earlier runs stay the same
        d["models"] = [{k: v for k, v in dataclasses.asdict(m).items()
                        if k != "input_size" or v is not None} for m in self.models]
        d["methods"] = list(self.methods)
        d["metrics"] = list(self.metrics)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; also reads configs stored by earlier versions."""
        d = _known(cls, data, "run config")
        d["models"] = tuple(ModelSpec(**m) for m in d.get("models", [dataclasses.asdict(
            ModelSpec())]))
        return cls(**d)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def map_options(self) -> dict[str, Any]:
        d = self.to_dict()
        return {k: d[k] for k in self.MAP_KEYS}

    def changed_map_options(self, other: RunConfig) -> list[str]:
        """The map-deciding options in which ``other`` differs from this config."""
        mine, theirs = self.map_options(), other.map_options()
        return [k for k in self.MAP_KEYS if mine[k] != theirs[k]]

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()
                              ).hexdigest()[:16]

    def options_for(self, method: str) -> dict[str, Any]:
        return self.method_options.get(method, {})

    @property
    def task_resources(self) -> dict[str, float]:
        """What each task asks of its Dask worker: ``resources``, else a ``1/tasks_per_gpu``
        share of one GPU with CUDA."""
        if self.resources is not None:
            return dict(self.resources)
        return device_resources(self.device, self.tasks_per_gpu)

    @property
    def target_spec(self) -> TargetSpec:
        return TargetSpec.parse(self.target)

    @property
    def causal_pixels(self) -> int | None:
        """Pixels per deletion/insertion step, None when the causal metrics are off."""
        return self.causal_step if self.causal else None

    def causal_pixels_at(self, size: int) -> int | None:
        """:attr:`causal_pixels` for a ``size`` x ``size`` frame (``causal_step`` is stated at
        the paper's 224 x 224: :func:`~shapcam.evaluation.metrics.step_in_frame`)."""
        return None if self.causal_pixels is None else step_in_frame(self.causal_pixels, size)


class _Spec:
    """``to_dict`` / ``from_dict`` of a flat spec dataclass (Prefect parameters)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        return cls(**_known(cls, data, cls.__name__))


@dataclass(frozen=True)
class DistillSpec(_Spec):
    """Paper Table 4 (``shapcam distill``): data, the schedule, the losses, the variants."""

    dataset: str = "cifar10"
    root: str | None = None
    limit: int | None = None
    seed: int = 0
    teacher: str = "wrn-40-2"
    student: str = "wrn-16-2"
    teacher_checkpoint: str | None = None
    epochs: int = 200
    teacher_epochs: int | None = None  # None: ``epochs``
    lr: float = 0.1
    batch_size: int = 128
    alpha: float = 1.0
    temperature: float = 4.0
    permutations: int = 16
    scorecam_channels: int | None = 16  # teacher and student alike; None: every channel
    variants: str = "all"
    device: str = "cpu"
    threads: int = 1
    teacher_threads: int | None = None  # None: ``threads``

    def __post_init__(self) -> None:
        from shapcam.training.distillation import parse_variants

        if self.dataset not in ("cifar10", "digits"):
            raise ShapCAMError(f"unknown dataset {self.dataset!r}; use cifar10 or digits")
        if self.dataset == "cifar10" and self.root is None:
            raise ShapCAMError("--root is required for cifar10 (the folder holding "
                               "cifar-10-batches-py); or use --dataset digits offline")
        try:
            parse_variants(self.variants)
        except ValueError as exc:
            raise ShapCAMError(str(exc)) from exc
        if self.scorecam_channels is not None and self.scorecam_channels < 1:
            raise ShapCAMError(f"scorecam_channels must be >= 1 or None (every channel), got "
                               f"{self.scorecam_channels}")



@dataclass(frozen=True)
class FinetuneSpec(_Spec):
    """Fine-tuning on VOC2007 (``shapcam finetune-voc``): SGD with a step schedule at 60% and
    80% of the epochs."""

    root: str
    model: str = "vgg16"
    weights: str = DEFAULT_WEIGHTS
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 32
    train_split: str = "trainval"
    test_split: str = "test"
    limit: int | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 1

