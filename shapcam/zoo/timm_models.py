"""timm classifiers by ``timm:NAME``: weights through timm's own mechanism, default layers.

Names are timm's, with an optional pretrained tag (``timm:resnet50``,
``timm:resnet50.a1_in1k``). Weights, as a spec string:

- ``"pretrained"`` (also the project-wide default spelling ``IMAGENET1K_V1``, and
  ``DEFAULT``): the tag's pretrained weights, from the Hugging Face cache that timm uses, or
  downloaded there by timm when the machine has a network;
- ``"random"``: random initialisation (tests, timing);
- a path to a local state dict.

The pipeline feeds every model the paper's input: 224 x 224, ImageNet mean and std. A timm
model whose pretrained configuration normalises otherwise (``mean = std = 0.5`` for many ViT
and test weights) gets an exact per-channel affine in front of its own ``forward``, so it sees
its own normalisation; the resize stays the paper's (bilinear, no crop), so boxes keep their
frame. The model keeps its class and module names, so timm's layer names are the target names.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from torch import nn

from ..errors import ShapCAMError
from .preprocessing import adapt_normalisation
from .state_dicts import is_path, load_state_dict_file
from .tokens import check_token_model, is_token_model, is_transformer
from .tokens import default_layer as token_default_layer

PREFIX = "timm:"
#: Pretrained-weight specs that mean "the tag's pretrained weights".
PRETRAINED_SPECS = ("pretrained", "DEFAULT", "IMAGENET1K_V1")
#: The target layer of each family (the model's class in timm): the last spatial map before
#: the head's pooling. Other CNN families use :func:`shapcam.zoo.models.auto_target_layer`.
FAMILY_LAYERS: dict[str, str] = {
    "ResNet": "layer4",  # ResNet, ResNeXt, SE-ResNet, ResNet-D ...
    "ConvNeXt": "stages",  # head: pool -> LayerNorm -> Linear (generic path)
    "EfficientNet": "bn2",  # BatchNormAct2d after conv_head
    "RegNet": "s4",
    "MobileNetV3": "blocks",  # the head pools before its 1x1 conv_head (generic path)
}


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise ShapCAMError("timm is not installed; install it with pip install "
                           "'shapcam[timm]' (or pip install timm) to use timm: models") from None
    return timm


def architecture(name: str) -> str:
    """``timm:resnet50.a1_in1k`` -> ``resnet50.a1_in1k``, checked against timm's registry; an
    unknown name lists the closest ones."""
    timm = _timm()
    bare = name.removeprefix(PREFIX)
    if not bare or not timm.is_model(bare):
        names = timm.list_models()
        close = difflib.get_close_matches(bare.split(".")[0], names, n=6, cutoff=0.6)
        hint = f"closest names: {', '.join(close)}" if close else \
            "see timm.list_models() for the names"
        raise ShapCAMError(f"unknown timm model {bare!r}; {hint}")
    return bare


def _cached_file(bare: str) -> Path | None:
    """The tag's weight file in the Hugging Face cache, or None (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(bare)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        return None
    filenames = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else \
        ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    for filename in filenames:
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _not_available(bare: str, reason: str) -> ShapCAMError:
    from huggingface_hub.constants import HF_HUB_CACHE

    return ShapCAMError(
        f"cannot load timm:{bare} pretrained weights: {reason} (cache {HF_HUB_CACHE}). What "
        f"works: network access (timm caches the file), 'random' weights, or a state-dict "
        f"file (timm:{bare}:PATH in --models, --weights PATH)")


def ensure_pretrained(bare: str) -> None:
    """Fail early, in one line, when pretrained weights are neither cached nor downloadable
    (``HF_HUB_OFFLINE=1``); with a network timm downloads them at load time."""
    if _cached_file(bare) is None and _offline():
        raise _not_available(bare, "not in the cache and HF_HUB_OFFLINE is set")


def create(name: str, spec: str, num_classes: int | None) -> tuple[nn.Module, str]:
    """``(model in eval mode, recorded weight spec)`` for ``timm:NAME`` and a weight spec."""
    timm = _timm()
    bare = architecture(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if spec == "random":
        model = timm.create_model(bare, pretrained=False, **kwargs)
    elif spec in PRETRAINED_SPECS:
        ensure_pretrained(bare)
        try:
            model = timm.create_model(bare, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError) as exc:  # offline, no such tag, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise _not_available(bare, reason) from None
        spec = f"pretrained:{model.pretrained_cfg.get('hf_hub_id') or bare}"
    else:
        path = Path(spec)
        if not is_path(spec):
            raise ShapCAMError(f"unknown weights {spec!r} for timm:{bare}; use 'pretrained', "
                               "'random' or a path to a state-dict file")
        if not path.is_file():
            raise ShapCAMError(f"weights file {path} does not exist")
        model = timm.create_model(bare, pretrained=False, **kwargs)
        load_state_dict_file(model, name, path)
    family = type(model).__name__
    if is_token_model(model):
        check_token_model(model)
    elif not is_transformer(model) and hasattr(model, "patch_embed"):
        raise ShapCAMError(
            f"timm:{bare} is a {family}, a transformer whose tokens this version does not "
            "explain (ViT and DeiT do, through their patch tokens); CNN families work too")
    adapt_normalisation(model, model.pretrained_cfg.get("mean"), model.pretrained_cfg.get("std"))
    return model.eval(), spec


def default_layer(model: nn.Module) -> str | None:
    """The family's target layer (:data:`FAMILY_LAYERS`; vision transformers: the tokens
    entering the last block), or None (then found by a forward)."""
    if is_transformer(model):
        return token_default_layer(model)
    return FAMILY_LAYERS.get(type(model).__name__)
