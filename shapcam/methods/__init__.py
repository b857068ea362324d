"""Saliency methods behind one interface (:class:`~shapcam.methods.base.CAMMethod`)."""

from .base import CAMMethod, CAMResult, minmax, upsample_normalise
from .gradcam import GradCAM, GradCAMPlusPlus
from .perturbation import RISE, MeaningfulPerturbation, ScoreCAM
from .shapcam import ShapCAM

#: Method name -> class, for the CLI and the pipeline.
METHODS: dict[str, type[CAMMethod]] = {
    "shapcam": ShapCAM,
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "scorecam": ScoreCAM,
    "rise": RISE,
    "mask": MeaningfulPerturbation,
}

__all__ = ["METHODS", "RISE", "CAMMethod", "CAMResult", "GradCAM", "GradCAMPlusPlus",
           "MeaningfulPerturbation", "ScoreCAM", "ShapCAM", "minmax", "upsample_normalise"]
