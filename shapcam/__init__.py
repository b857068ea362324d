"""Shap-CAM: Shapley-value class activation maps (Zheng et al., ECCV 2022) and its baselines.

    from shapcam import ShapCAM, load_model
    lm = load_model("mobilenet_v2", "IMAGENET1K_V1")
    result = ShapCAM(lm)(x)          # x: (B, 3, 224, 224) normalised; result.maps in [0, 1]
"""

from .errors import ShapCAMError
from .methods import (
    METHODS,
    RISE,
    CAMMethod,
    CAMResult,
    GradCAM,
    GradCAMPlusPlus,
    MeaningfulPerturbation,
    ScoreCAM,
    ShapCAM,
)
from .models import LoadedModel, load_model, preprocess_transform
from .shapley import ShapleyResult, block_groups, exact_shapley, permutation_shapley
from .split import split_model

__version__ = "0.1.0"

__all__ = [
    "METHODS", "RISE", "CAMMethod", "GradCAM", "GradCAMPlusPlus", "MeaningfulPerturbation",
    "ScoreCAM", "CAMResult", "LoadedModel", "ShapCAM", "ShapCAMError",
    "ShapleyResult", "block_groups", "exact_shapley", "load_model", "permutation_shapley",
    "preprocess_transform", "split_model",
]
