"""The paper's input frame: resize to 224 x 224 (no crop), scale to [0, 1], ImageNet
normalisation, and its inverse."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

#: ImageNet statistics used by every torchvision classifier and by the paper.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: The paper resizes every image to 224 x 224 (no crop), so boxes scale with the image.
INPUT_SIZE: int = 224

def preprocess_transform(size: int = INPUT_SIZE) -> T.Compose:
    """The paper's preprocessing: resize to ``size`` x ``size``, scale to [0, 1], normalise."""
    return T.Compose([
        T.ToImage(),
        T.Resize((size, size), antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def preprocess(image: Any, size: int = INPUT_SIZE) -> torch.Tensor:
    """:func:`preprocess_transform` as plain function calls, for decoder threads: a transform
    module called while another thread traces a model with torch.fx would go through fx's
    patched ``Module.__call__`` and fail ("module is not installed as a submodule")."""
    x = TF.to_image(image)
    x = TF.resize(x, [size, size], antialias=True)
    x = TF.to_dtype(x, torch.float32, scale=True)
    return TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD)).as_subclass(torch.Tensor)


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise a [0, 1] batch ``(B, 3, H, W)`` (used after masking in [0, 1] space)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, clipped to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)
