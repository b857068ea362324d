"""Shap-CAM: Shapley-value class activation maps (Zheng et al., ECCV 2022) and its baselines,
the science layer: models and their trunk/head split, Shapley estimators, the six methods,
metrics, dataset readers, training science. Pure PyTorch and numpy; no Prefect, Dask, Zarr.

    from shapcam import ShapCAM, load_model
    lm = load_model("mobilenet_v2", "IMAGENET1K_V1")
    result = ShapCAM(lm)(x)          # x: (B, 3, 224, 224) normalised; result.maps in [0, 1]
"""

from .errors import ShapCAMError
from .methods import (
    METHOD_TITLES,
    METHODS,
    RISE,
    CAMMethod,
    CAMResult,
    GradCAM,
    GradCAMPlusPlus,
    MeaningfulPerturbation,
    ScoreCAM,
    ShapCAM,
    build_method,
    method_options,
)
from .methods.shapley import ShapleyResult, block_groups, exact_shapley, permutation_shapley
from .zoo.models import LoadedModel, load_model
from .zoo.preprocessing import preprocess_transform
from .zoo.split import split_model

__version__ = "0.1.0"

__all__ = [
    "METHODS", "METHOD_TITLES", "RISE", "CAMMethod", "GradCAM", "GradCAMPlusPlus",
    "MeaningfulPerturbation", "ScoreCAM", "CAMResult", "LoadedModel", "ShapCAM", "ShapCAMError",
    "ShapleyResult", "block_groups", "build_method", "exact_shapley", "load_model",
    "method_options", "permutation_shapley",
    "preprocess_transform", "split_model",
]
