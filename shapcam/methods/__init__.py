"""Saliency methods behind one interface (:class:`~shapcam.methods.base.CAMMethod`)."""

from .base import CAMMethod, CAMResult, minmax, upsample_normalise
from .shapcam import ShapCAM

#: Method name -> class, for the CLI and the pipeline.
METHODS: dict[str, type[CAMMethod]] = {"shapcam": ShapCAM}

__all__ = ["METHODS", "CAMMethod", "CAMResult", "ShapCAM", "minmax", "upsample_normalise"]
