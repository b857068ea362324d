"""Loading torchvision classifiers, their default target layers and the paper's preprocessing.

Weights are given as a *spec* string:

- ``"random"`` (or ``None``): random initialisation (tests, timing), drawn from the fixed seed
  :data:`RANDOM_WEIGHTS_SEED`, so every worker of a run builds the same model;
- a torchvision weight enum name: ``"DEFAULT"``, ``"IMAGENET1K_V1"`` or the full
  ``"MobileNet_V2_Weights.IMAGENET1K_V1"``; loaded through torchvision's own mechanism, i.e.
  from ``$TORCH_HOME/hub/checkpoints`` when present, downloaded otherwise;
- a path to a local state dict (``.pth``/``.pt``), optionally wrapped as ``{"state_dict": ...}``.

Your own classifier is named by the import path of a factory, ``package.module:function``
(:mod:`shapcam.zoo.factory`): it declares its layer, classes, input size and normalisation.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..errors import ShapCAMError
from . import factory, timm_models
from .preprocessing import INPUT_SIZE, adapt_normalisation, check_input_size
from .state_dicts import checkpoint_meta, is_path, load_state_dict_file

#: Seed of ``"random"`` weights (the caller's RNG state is left as it was).
RANDOM_WEIGHTS_SEED: int = 0
#: Target layers of the paper and of Score-CAM; other models use :func:`auto_target_layer`.
DEFAULT_TARGET_LAYERS: dict[str, str] = {
    "vgg16": "features.29",  # last ReLU of conv5_3: 512 x 14 x 14
    "vgg16_bn": "features.42",
    "resnet18": "layer4",  # 512 x 7 x 7
    "resnet50": "layer4",
    "mobilenet_v2": "features.18",  # 1280 x 7 x 7
}


@dataclass
class LoadedModel:
    """A classifier in eval mode with what is needed to explain it."""

    model: nn.Module
    name: str
    weights: str
    target_layer: str
    categories: list[str] = field(default_factory=list)
    #: Square side of the model's input in pixels: maps, boxes and metrics live in this frame.
    input_size: int = INPUT_SIZE

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def class_name(self, index: int) -> str:
        return self.categories[index] if 0 <= index < len(self.categories) else str(index)


def available_models() -> list[str]:
    """Names of torchvision's image classifiers (``torchvision.models.list_models``)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _suggest(name: str, candidates: list[str], limit: int = 8) -> str:
    close = difflib.get_close_matches(name, candidates, n=limit, cutoff=0.5)
    shown = close or candidates[:limit]
    more = "" if len(candidates) <= len(shown) else f" (and {len(candidates) - len(shown)} more)"
    return ", ".join(shown) + more


def imagenet_categories() -> list[str]:
    """The 1000 ILSVRC2012 class names, as torchvision's weight metadata ships them (offline)."""
    return list(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def _weights_enum(name: str, spec: str) -> torchvision.models.WeightsEnum:
    enum_cls = torchvision.models.get_model_weights(name)
    member = spec.split(".")[-1]
    if "." in spec and spec.split(".")[0] != enum_cls.__name__:
        raise ShapCAMError(
            f"weights {spec!r} belong to another model; {name} takes {enum_cls.__name__}.*"
        )
    try:
        return enum_cls[member] if member != "DEFAULT" else enum_cls.DEFAULT
    except KeyError:
        members = [m for m in enum_cls.__members__] + ["DEFAULT"]
        raise ShapCAMError(
            f"unknown weights {spec!r} for {name}; use one of {', '.join(members)}, "
            "'random', or a path to a state-dict file"
        ) from None


def _check_name(name: str) -> None:
    if factory.is_import_path(name):
        try:
            factory.import_factory(name)  # imports it: one line when it cannot be
        except ShapCAMError as exc:
            head = name.partition(":")[0]
            close = difflib.get_close_matches(head, available_models(), n=3, cutoff=0.75)
            if close and "." not in head:  # e.g. resnt18:IMAGENET1K_V1
                raise ShapCAMError(f"{exc}; or did you mean the torchvision model "
                                   f"{', '.join(close)}?") from None
            raise
        return
    if timm_models.is_timm(name):
        timm_models.architecture(name)
        return
    names = available_models()
    if name not in names:
        raise ShapCAMError(f"unknown model {name!r}; torchvision classifiers include: "
                           f"{_suggest(name, names)}")


def ensure_weights(name: str, weights: str | os.PathLike[str] | None) -> None:
    """Check, before any work starts, that ``weights`` of ``name`` can be loaded: a state-dict
    file exists, or an enum's checkpoint is cached (from the offline package or a download,
    made now). Raises one :class:`ShapCAMError` saying what works otherwise."""
    spec = "random" if weights is None else str(weights)
    _check_name(name)
    if factory.is_import_path(name):
        spec = factory.weights_spec(name, spec)
    if spec in ("random", "factory"):
        return
    if is_path(spec):
        _weights_file(spec)
        return
    if timm_models.is_timm(name):
        if spec not in timm_models.PRETRAINED_SPECS:
            raise ShapCAMError(f"unknown weights {spec!r} for {name}; use 'pretrained', "
                               "'random' or a path to a state-dict file")
        timm_models.ensure_pretrained(timm_models.architecture(name))
        return
    _cached_checkpoint(name, _weights_enum(name, spec))


def _cached_checkpoint(name: str, enum: torchvision.models.WeightsEnum) -> Path:
    """The enum's checkpoint in the torch cache: already there, installed from the offline
    package (MobileNetV2 IMAGENET1K_V1), or downloaded as torchvision would."""
    from .weights import CHECKPOINT, install_offline_weights

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    file = cache / Path(enum.url).name
    if file.is_file():
        return file
    if file.name == CHECKPOINT:
        with contextlib.suppress(RuntimeError):  # package missing: the download may still work
            return install_offline_weights()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        prefix = torch.hub.HASH_REGEX.search(file.name)
        torch.hub.download_url_to_file(enum.url, str(file),
                                       prefix.group(1) if prefix else None, progress=True)
    except (OSError, RuntimeError) as exc:
        enum_cls = type(enum)
        cached = [m for m, w in enum_cls.__members__.items()
                  if (cache / Path(w.url).name).is_file()]
        reason = str(getattr(exc, "reason", exc)).strip().splitlines()[0]
        raise ShapCAMError(
            f"cannot load {name} weights {enum_cls.__name__}.{enum.name}: not in the cache "
            f"{cache} and the download of {enum.url} failed ({reason}). What works: "
            + (f"a cached enum ({', '.join(cached)}), " if cached else "")
            + f"a state-dict file (--weights PATH, or {name}:PATH in --models), 'random' "
            "weights, or network access (torchvision then caches the file)") from None
    return file


def load_model(
    name: str,
    weights: str | os.PathLike[str] | None = "IMAGENET1K_V1",
    *,
    target_layer: str | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    categories: list[str] | None = None,
    input_size: int | None = None,
) -> LoadedModel:
    """Load a torchvision, timm or your own classifier, in eval mode, on ``device``.

    Args:
        name: a torchvision classifier name (``vgg16``, ``resnet18``, ``mobilenet_v2``, ...),
            ``timm:NAME`` (:mod:`shapcam.zoo.timm_models`: its weight specs, families, input
            normalisation) or the import path of your factory, ``package.module:function``
            (:mod:`shapcam.zoo.factory`).
        weights: ``"random"``/``None``, a torchvision weight enum name (default
            ``IMAGENET1K_V1``, the one ``.ci/setup`` installs for MobileNetV2; ``"DEFAULT"`` is
            torchvision's newest, often ``IMAGENET1K_V2``, downloaded on first use), or a
            state-dict path. A factory's model is taken as built unless a path is given.
        target_layer: dotted module name to explain; defaults to the factory's,
            :data:`DEFAULT_TARGET_LAYERS` or :func:`auto_target_layer`.
        num_classes: classifier size for random weights or a custom state dict (default 1000).
        device: where the model lives; everything computed from it stays there.
        categories: class names; defaults to the weights' metadata or the ImageNet names.
        input_size: square side of the input in pixels; defaults to what the model declares
            (its factory, a weight enum's crop size such as Inception v3's 299), else 224.
    """
    _check_name(name)
    spec = "random" if weights is None else str(weights)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    declared: int | None = None
    if factory.is_import_path(name):
        model, spec, declared, layer_hint, categories = _load_factory(name, spec, categories)
        target_layer = target_layer or layer_hint
    elif timm_models.is_timm(name):
        with random_weights():
            model, spec = timm_models.create(name, spec, num_classes)
    elif spec == "random":
        with random_weights():
            model = torchvision.models.get_model(name, weights=None, **kwargs)
    elif is_path(spec):
        path = _weights_file(spec)
        meta = checkpoint_meta(path)
        if num_classes is None and meta.get("num_classes"):
            kwargs = {"num_classes": int(meta["num_classes"])}  # e.g. `shapcam finetune-voc`
        categories = categories or meta.get("categories")
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        load_state_dict_file(model, name, path)
    else:
        enum = _weights_enum(name, spec)
        if num_classes not in (None, len(enum.meta["categories"])):
            raise ShapCAMError(f"{enum} has {len(enum.meta['categories'])} classes, "
                               f"not num_classes={num_classes}")
        _cached_checkpoint(name, enum)  # offline package, cache or download; clear errors
        model = torchvision.models.get_model(name, weights=enum)
        spec = str(enum)
        categories = categories or list(enum.meta["categories"])
        declared = getattr(enum.transforms(), "crop_size", [None])[0]
    size = check_input_size(input_size or declared or INPUT_SIZE, f"model {name}")
    model.eval().to(device)
    n_out = _num_outputs(model, size, forward=factory.is_import_path(name))
    if categories is None:
        categories = imagenet_categories() if n_out == 1000 else [str(i) for i in range(n_out)]
    elif len(categories) != n_out:
        raise ShapCAMError(f"model {name}: {len(categories)} class names for {n_out} outputs")
    # timm's family layers only for timm models: torchvision's MobileNetV3 shares the class
    # name of timm's, not its module names
    family = timm_models.default_layer(model) if timm_models.is_timm(name) else None
    layer = (target_layer or DEFAULT_TARGET_LAYERS.get(name) or family
             or auto_target_layer(model, size))
    get_module(model, layer)  # validates the name
    return LoadedModel(model=model, name=name, weights=spec, target_layer=layer,
                       categories=list(categories), input_size=size)


def _weights_file(spec: str) -> Path:
    path = Path(spec)
    if not path.is_file():
        raise ShapCAMError(f"weights file {path} does not exist")
    return path


def _load_factory(name: str, spec: str, categories: list[str] | None
                  ) -> tuple[nn.Module, str, int | None, str | None, list[str] | None]:
    """``(model, weights spec, declared input size, declared layer, categories)`` of the
    factory ``name``, with a state-dict or checkpoint file loaded on top when ``spec`` is one,
    and its own normalisation put in front (:func:`adapt_normalisation`)."""
    with random_weights():
        built = factory.build(name)
    model = built.model
    spec = factory.weights_spec(name, spec)
    if spec != "factory":
        path = _weights_file(spec)
        categories = categories or checkpoint_meta(path).get("categories")
        load_state_dict_file(model, name, path)
    adapt_normalisation(model, built.mean, built.std)
    return model, spec, built.input_size, built.target_layer, categories or built.categories


@contextlib.contextmanager
def random_weights():
    """Initialise inside the block from :data:`RANDOM_WEIGHTS_SEED`, then restore the global
    RNG (CPU) state, so ``"random"`` means the same weights in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        yield


@torch.no_grad()
def _num_outputs(model: nn.Module, input_size: int = INPUT_SIZE, forward: bool = False) -> int:
    """Classes of ``model``: its last Linear/Conv2d, or (``forward``: a model of unknown make)
    the width of its output for a zero image, which also shows it runs at ``input_size``."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if last and not forward:
        return last[-1].out_features if isinstance(last[-1], nn.Linear) else last[-1].out_channels
    device = next(model.parameters()).device
    try:
        out = model(torch.zeros(1, 3, input_size, input_size, device=device))
    except Exception as exc:  # noqa: BLE001 - the user's model does not take this input
        raise ShapCAMError(f"{type(model).__name__} fails on a {input_size} x {input_size} "
                           f"input ({type(exc).__name__}: {str(exc).splitlines()[0]}); declare "
                           "its input_size in the factory or pass --input-size") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ShapCAMError(f"{type(model).__name__} does not return logits (B, classes) for a "
                           f"{input_size} x {input_size} input")
    return int(out.shape[1])


def get_module(model: nn.Module, layer: str) -> nn.Module:
    """The sub-module called ``layer``; an unknown name lists the closest candidates."""
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        names = [n for n in modules if n]
        raise ShapCAMError(f"layer {layer!r} does not exist in {type(model).__name__}; "
                           f"closest names: {_suggest(layer, names)}")
    return modules[layer]


@torch.no_grad()
def auto_target_layer(model: nn.Module, input_size: int = INPUT_SIZE) -> str:
    """The last module whose output is still spatial (4-D, h*w > 1) before global pooling.

    Found by one forward pass with hooks on every leaf and container module; among the modules
    that output a 4-D map with more than one position, the one that finishes last wins (a
    container finishes after its children, so a whole stage is preferred to its last ReLU).
    """
    order: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for mname, module in model.named_modules():
        if not mname:
            continue

        def hook(_m, _i, out, mname=mname):
            if isinstance(out, torch.Tensor):
                order.append((mname, tuple(out.shape)))

        hooks.append(module.register_forward_hook(hook))
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for h in hooks:
            h.remove()
    spatial = [n for n, s in order if len(s) == 4 and s[2] * s[3] > 1]
    if not spatial:
        raise ShapCAMError(f"{type(model).__name__} has no module with a spatial output; "
                           "pass target_layer explicitly")
    return spatial[-1]


def resolve_target(target: str | int | None, lm: LoadedModel) -> int | None:
    """A class given as an index or an exact (case-insensitive) class name; None stays None
    (the predicted class)."""
    if target is None:
        return None
    text = str(target)
    if text.lstrip("-").isdigit():
        return int(text)
    lowered = [c.lower() for c in lm.categories]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise ShapCAMError(f"unknown class {text!r}: pass an index 0..{len(lm.categories) - 1} "
                       "or an exact class name such as "
                       f"{', '.join(repr(c) for c in lm.categories[:3])}")
