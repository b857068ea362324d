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


#: Annotation words -> the Python types of values that fit them (``Literal``: the method
#: checks the value itself).
_FITS: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
    "None": (type(None),), "tuple": (tuple, list), "Literal": (str,)}


def check_options(name: str, options: dict[str, Any]) -> None:
    """An option that method ``name`` does not take is an error listing those it takes; a
    value of the wrong type (``permutations="abc"``) is an error naming the type it takes."""
    known = method_options(name)
    params = inspect.signature(method_class(name).__init__).parameters
    for key, value in options.items():
        if key not in known:
            listed = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
            raise ShapCAMError(f"bad option for {name}: it has no option {key!r} "
                               f"(its options: {listed})")
        annotation = str(params[key].annotation)
        words = [w.strip().split("[")[0] for w in annotation.split("|")]
        if value is None and "None" not in annotation:
            raise ShapCAMError(f"bad option for {name}: {key} takes {annotation}, not none")
        fits = [_FITS.get(w) for w in words]
        if value is None or None in fits:  # an annotation this check does not read
            continue
        allowed = tuple(t for ts in fits for t in ts)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ShapCAMError(f"bad option for {name}: {key} takes {annotation}, got "
                               f"{value!r}")


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
