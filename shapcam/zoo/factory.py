"""Your own classifier, by the import path of a factory: ``package.module:function``.

The factory is called with no argument (under the fixed seed of ``"random"`` weights, so every
worker builds the same model) and returns either an ``nn.Module`` or a dict::

    {"model": module,            # required
     "target_layer": "features",  # dotted name of the layer to explain
     "categories": [...],         # class names, in output order
     "input_size": 32,            # square side of its input, in pixels
     "mean": (...), "std": (...)} # its input normalisation (after scaling to [0, 1])

Without a key, the module's timm-style ``pretrained_cfg`` (``input_size``, ``mean``, ``std``)
is read, then the defaults: the layer found by a forward, class indices as names, 224 x 224,
ImageNet statistics. Weights: ``factory`` (as built; also ``random`` and the project-wide
default spelling) or a state-dict / checkpoint file loaded on top.

The module is imported as Python imports anything: from an installed package, ``PYTHONPATH``
or the working directory (added to ``sys.path``, as uvicorn and gunicorn do). Importing runs the
module's code: name only code you trust.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ShapCAMError
from .preprocessing import check_input_size

#: ``module.path:attribute`` (the attribute may be dotted: ``module:Class.build``).
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
#: Weight specs meaning "as the factory built it".
AS_BUILT = ("factory", "random", "DEFAULT", "IMAGENET1K_V1", "pretrained")
_KEYS = ("model", "target_layer", "categories", "input_size", "mean", "std")


def weights_spec(path: str, spec: str) -> str:
    """``factory`` for the specs meaning "as built", else ``spec`` when it names a file; one
    error otherwise (the file itself is checked where it is loaded)."""
    from .state_dicts import is_path

    if spec in AS_BUILT:
        return "factory"
    if is_path(spec):
        return spec
    raise ShapCAMError(f"unknown weights {spec!r} for {path}; use 'factory' (as built) or a "
                       "path to a state-dict or checkpoint file")


def is_import_path(text: str) -> bool:
    """Whether a model name is a factory's import path (``timm:NAME`` is timm's)."""
    return bool(_IMPORT_PATH.match(text)) and not text.startswith("timm:")


@dataclass
class FactoryModel:
    """What a factory returned, with its metadata (None: not declared)."""

    model: nn.Module
    target_layer: str | None = None
    categories: list[str] | None = None
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def import_factory(path: str) -> Callable[[], Any]:
    """The callable at ``path``; one :class:`ShapCAMError` line when it cannot be imported."""
    if not is_import_path(path):
        raise ShapCAMError(f"model {path!r} is not an import path: use package.module:factory")
    module_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the project you run it from
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise ShapCAMError(
            f"model {path}: module {missing!r} cannot be imported (not installed, not on "
            "PYTHONPATH, not in the working directory); install your package or set "
            "PYTHONPATH, on the workers too (docs/models.md)") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise ShapCAMError(f"model {path}: importing {module_name} failed: "
                           f"{type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ShapCAMError(f"model {path}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ShapCAMError(f"model {path}: {attr} is a {type(obj).__name__}, not a callable "
                           "returning an nn.Module")
    return obj


def build(path: str) -> FactoryModel:
    """Call the factory at ``path`` and check what it returns."""
    factory = import_factory(path)
    try:
        out = factory()
    except Exception as exc:  # noqa: BLE001 - the user's factory raised
        raise ShapCAMError(f"model {path}: the factory raised {type(exc).__name__}: "
                           f"{exc}") from None
    meta: dict[str, Any] = {}
    if isinstance(out, dict):
        unknown = sorted(set(out) - set(_KEYS))
        if unknown or "model" not in out:
            raise ShapCAMError(f"model {path}: the factory's dict needs 'model' and may hold "
                               f"{', '.join(_KEYS[1:])}; got {', '.join(sorted(out))}")
        meta, out = {k: v for k, v in out.items() if k != "model"}, out["model"]
    if not isinstance(out, nn.Module):
        raise ShapCAMError(f"model {path}: the factory returned a {type(out).__name__}, not "
                           "an nn.Module (or a dict with 'model')")
    cfg = getattr(out, "pretrained_cfg", None) or {}
    size = meta.get("input_size", cfg.get("input_size"))
    mean, std = meta.get("mean", cfg.get("mean")), meta.get("std", cfg.get("std"))
    for what, v in (("mean", mean), ("std", std)):
        if v is not None and (len(v) != 3 or any(not isinstance(c, int | float) for c in v)
                              or (what == "std" and min(v) <= 0)):
            raise ShapCAMError(f"model {path}: {what} {v!r} is not 3 numbers (RGB"
                               f"{', > 0' if what == 'std' else ''})")
    categories = meta.get("categories")
    if categories is not None and not all(isinstance(c, str) for c in categories):
        raise ShapCAMError(f"model {path}: categories must be a list of class names (str)")
    return FactoryModel(
        out, meta.get("target_layer"), list(categories) if categories is not None else None,
        None if size is None else check_input_size(size, f"model {path}"),
        None if mean is None else tuple(float(c) for c in mean),
        None if std is None else tuple(float(c) for c in std))
