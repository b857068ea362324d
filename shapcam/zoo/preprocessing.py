"""The input frame: resize to ``size`` x ``size`` (no crop; the paper's 224 by default, or the
model's own), scale to [0, 1], ImageNet normalisation, and its inverse. A model trained with
another mean/std gets an exact affine in front of its forward (:func:`adapt_normalisation`), so
the pipeline feeds every model the same ImageNet-normalised tensors."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from ..errors import ShapCAMError

#: ImageNet statistics used by every torchvision classifier and by the paper.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: The paper resizes every image to 224 x 224 (no crop), so boxes scale with the image.
INPUT_SIZE: int = 224
#: The input sizes a model may declare (square side in pixels): the maps, the stored arrays
#: and the perturbation batches grow with its square.
INPUT_SIZES: tuple[int, int] = (16, 1024)


def check_input_size(size: object, where: str) -> int:
    """``size`` as an int within :data:`INPUT_SIZES`; else one error naming ``where``."""
    lo, hi = INPUT_SIZES
    if isinstance(size, list | tuple) and len(size) in (2, 3) and len(set(size[-2:])) == 1:
        size = size[-1]  # timm's (3, H, W) or (H, W) with H == W
    if isinstance(size, bool) or not isinstance(size, int) or not lo <= size <= hi:
        raise ShapCAMError(f"{where}: input size {size!r} is not a square side of {lo} to "
                           f"{hi} pixels (e.g. 224, or 32 for CIFAR models)")
    return size


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


def adapt_normalisation(model: nn.Module, mean, std) -> None:
    """Make ``model`` take ImageNet-normalised input when it was trained with another
    ``mean``/``std``: ``x_own = x * std_in / std + (mean_in - mean) / std`` before its forward.

    Done by giving the instance a subclass of its own class whose ``forward`` applies the
    affine first (buffers, not parameters, not in the state dict): module names, ``fx`` tracing
    and the trunk/head split are those of the model itself.
    """
    if mean is None or std is None:
        return
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    mean_in, std_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    if mean_t.numel() != 3 or (torch.allclose(mean_t, mean_in) and torch.allclose(std_t, std_in)):
        return
    model.register_buffer("input_scale", (std_in / std_t).view(1, 3, 1, 1), persistent=False)
    model.register_buffer("input_shift", ((mean_in - mean_t) / std_t).view(1, 3, 1, 1),
                          persistent=False)
    base = type(model)

    def forward(self, x):  # one argument: fx cannot trace *args
        return base.forward(self, x * self.input_scale + self.input_shift)

    model.__class__ = type(base.__name__, (base,), {"forward": forward,
                                                    "__module__": base.__module__,
                                                    "__qualname__": base.__qualname__})
