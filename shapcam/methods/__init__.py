"""Saliency methods behind one interface (:class:`~shapcam.methods.base.CAMMethod`), and the
registry that names them: :data:`METHODS`, each class carrying its ``title``; its options are its
constructor's keyword arguments (:func:`method_options`)."""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import ShapCAMError
from .base import CAMMethod, CAMResult, minmax, upsample_normalise
from .gradcam import GradCAM, GradCAMPlusPlus, gradcam_weights, gradcampp_weights
from .perturbation import RISE, MeaningfulPerturbation, ScoreCAM
from .shapcam import ShapCAM

#: Method name -> class, in the paper's column order.
METHODS: dict[str, type[CAMMethod]] = {
    cls.name: cls
    for cls in (MeaningfulPerturbation, RISE, GradCAM, GradCAMPlusPlus, ScoreCAM, ShapCAM)
}
#: Method name -> the title tables, reports and the dashboard show.
METHOD_TITLES: dict[str, str] = {name: cls.title for name, cls in METHODS.items()}


def method_class(name: str) -> type[CAMMethod]:
    if name not in METHODS:
        raise ShapCAMError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def method_options(name: str) -> dict[str, Any]:
    """The options of method ``name`` (its keyword-only constructor arguments) with defaults."""
    params = inspect.signature(method_class(name).__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_options(name: str, options: dict[str, Any]) -> None:
    """An option that method ``name`` does not take is an error listing those it takes."""
    known = method_options(name)
    for key in options:
        if key not in known:
            listed = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
            raise ShapCAMError(f"bad option for {name}: it has no option {key!r} "
                               f"(its options: {listed})")


def build_method(name: str, model: Any, options: dict[str, Any] | None = None,
                 target_layer: str | None = None) -> CAMMethod:
    """``METHODS[name](model, target_layer, **options)`` with the options checked first."""
    options = options or {}
    check_options(name, options)
    return method_class(name)(model, target_layer, **options)


__all__ = ["METHODS", "METHOD_TITLES", "RISE", "CAMMethod", "CAMResult", "GradCAM",
           "GradCAMPlusPlus", "MeaningfulPerturbation", "ScoreCAM", "ShapCAM", "build_method",
           "check_options", "gradcam_weights", "gradcampp_weights", "method_class",
           "method_options", "minmax", "upsample_normalise"]
