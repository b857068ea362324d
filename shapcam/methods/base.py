"""The interface every saliency method implements.

A method takes a preprocessed batch ``x (B, 3, H, W)`` and targets ``(B,)`` (default: the
predicted classes) and returns a :class:`CAMResult`: ``maps (B, H, W)`` in [0, 1] at input size,
the raw map at layer resolution, and its extras. A new method overrides one function,
:meth:`CAMMethod.raw_maps` (pytorch-grad-cam's design); validation, the forward pass that finds
targets and probabilities, and the ``ReLU -> bilinear upsample -> min-max`` post-processing are
shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ShapCAMError
from ..zoo.models import LoadedModel
from ..zoo.split import HookTrunk, split_model
from ..zoo.tokens import is_transformer, token_split


@dataclass
class CAMResult:
    """Saliency maps of one batch; all tensors on the model's device."""

    maps: torch.Tensor  # (B, H, W) in [0, 1]
    raw: torch.Tensor  # (B, h, w) at layer resolution, signed where the method is
    targets: torch.Tensor  # (B,) explained classes
    probabilities: torch.Tensor  # (B,) softmax probability of the target on the image
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.maps.shape[0]


def minmax(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-map min-max normalisation to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    lo = flat.min(1).values.view(-1, *[1] * (maps.dim() - 1))
    hi = flat.max(1).values.view(-1, *[1] * (maps.dim() - 1))
    span = hi - lo
    return torch.where(span > eps, (maps - lo) / span.clamp_min(eps), torch.zeros_like(maps))


def linear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
    """Bilinear resizing along one axis as PyTorch's ``align_corners=False``: for each output
    position the two source positions and their float32 weights."""
    scale = torch.tensor(n_in, dtype=torch.float32) / n_out
    src = (scale * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5).clamp_min(0)
    lo = src.long()
    hi = torch.where(lo < n_in - 1, lo + 1, lo)
    w1 = src - lo.float()
    return lo, hi, 1 - w1, w1


def upsample_normalise(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``ReLU -> bilinear upsample to size -> min-max``: ``(B, h, w) -> (B, H, W)`` in [0, 1].

    The bilinear step is ``F.interpolate(mode="bilinear", align_corners=False)`` written as
    separate float32 multiplies and adds (no fused kernel), so the storage layer's numpy twin
    (:func:`storage.derive.maps_from_raw`, which derives stored maps from raw maps) gives the
    same values bit for bit on every device.
    """
    x = raw.float().clamp_min(0)
    (ylo, yhi, y0, y1), (xlo, xhi, x0, x1) = (
        [t.to(x.device) for t in linear_taps(n, m)]
        for n, m in zip(x.shape[-2:], size, strict=True))
    r0, r1 = x[..., ylo, :], x[..., yhi, :]
    t0 = r0[..., xlo] * x0 + r0[..., xhi] * x1
    t1 = r1[..., xlo] * x0 + r1[..., xhi] * x1
    return minmax(t0 * y0[:, None] + t1 * y1[:, None])


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, every submodule's own mode restored after.

    Methods explain the inference-time model (BatchNorm running statistics, no dropout) but must
    not change the mode their caller set: a student explained inside its training step keeps
    training and updating its BatchNorm statistics.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


class CAMMethod(ABC):
    """Base of all methods: ``method(x, targets) -> CAMResult``.

    Args:
        model: a :class:`~shapcam.zoo.models.LoadedModel` or a plain ``nn.Module``; its mode is left
            as the caller set it (each call runs it in eval mode and restores the mode).
        target_layer: dotted module name; defaults to the loaded model's default layer.
    """

    name: str = "base"  #: registry key (``--methods``, stored tables)
    title: str = "base"  #: how tables, reports and the dashboard label the method

    def __init__(self, model: LoadedModel | nn.Module, target_layer: str | None = None) -> None:
        if isinstance(model, LoadedModel):
            self.loaded: LoadedModel | None = model
            self.model = model.model
            target_layer = target_layer or model.target_layer
        else:
            self.loaded = None
            self.model = model
        if target_layer is None:
            raise ShapCAMError("pass target_layer when the model is a plain nn.Module")
        self.target_layer = target_layer
        #: whether the players are transformer tokens (the head then takes a key mask)
        self.tokens = is_transformer(self.model)
        if self.tokens:
            layer, self.head = token_split(self.model, target_layer)
            self.trunk = HookTrunk(self.model, layer)  # runs until that block returns
            return
        # traced in eval mode: fx bakes Python branches on ``self.training`` into the graph
        with eval_mode(self.model):
            size = self.loaded.input_size if self.loaded is not None else 224
            self.trunk, self.head = split_model(self.model, target_layer, input_size=size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def feature_map(self, features: torch.Tensor) -> torch.Tensor:
        """The target layer's output as a map ``(B, C, h, w)``: itself for CNNs, the patch
        tokens on their grid for vision transformers (what channel-weighting methods use)."""
        return self.head.grid(features) if self.tokens else features

    @torch.no_grad()
    def feature_hw(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` of the map for inputs of ``input_hw`` (one forward of a zero image)."""
        with eval_mode(self.model):
            x = torch.zeros(1, 3, *input_hw, device=self.device)
            return tuple(self.feature_map(self.trunk(x)).shape[-2:])

    def num_classes(self, logits: torch.Tensor) -> int:
        return logits.shape[-1]

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapCAMError(f"expected a batch of RGB images (B, 3, H, W), got {shape}; "
                               "use shapcam.data.images.load_batch or unsqueeze(0) a single image")
        if not x.is_floating_point():
            raise ShapCAMError(f"expected a float tensor (normalised image), got {x.dtype}")
        return x.to(self.device)

    def _check_targets(self, targets: Any, logits: torch.Tensor) -> torch.Tensor:
        B, n_classes = logits.shape
        if targets is None:
            return logits.argmax(1)
        t = torch.as_tensor(targets, device=logits.device).reshape(-1).long()
        if t.numel() == 1 and B > 1:
            t = t.expand(B)
        if t.numel() != B:
            raise ShapCAMError(f"got {t.numel()} targets for a batch of {B} images")
        bad = (t < 0) | (t >= n_classes)
        if bool(bad.any()):
            raise ShapCAMError(f"target class {int(t[bad][0])} is out of range: the model has "
                               f"{n_classes} classes (valid: 0..{n_classes - 1})")
        return t

    def __call__(self, x: torch.Tensor, targets: Any = None, **kwargs: Any) -> CAMResult:
        """Explain ``x`` for ``targets`` (int, sequence or tensor; default: predicted class)."""
        with eval_mode(self.model):
            return self._explain(x, targets, **kwargs)

    def _explain(self, x: torch.Tensor, targets: Any, **kwargs: Any) -> CAMResult:
        x = self._check_input(x)
        with torch.no_grad():
            features = self.trunk(x)
            logits = self.head(features)
        targets = self._check_targets(targets, logits)
        probs = logits.float().softmax(1).gather(1, targets.view(-1, 1)).squeeze(1)
        raw, extras = self.raw_maps(x, targets, features=features, logits=logits, **kwargs)
        maps = upsample_normalise(raw, tuple(x.shape[-2:]))
        return CAMResult(maps=maps, raw=raw, targets=targets, probabilities=probs, extras=extras)

    def raw_shape(self, feature_hw: tuple[int, int], input_hw: tuple[int, int]
                  ) -> tuple[int, int]:
        """Shape of this method's raw map (layer resolution unless the method says otherwise)."""
        return feature_hw

    @abstractmethod
    def raw_maps(self, x: torch.Tensor, targets: torch.Tensor, *, features: torch.Tensor,
                 logits: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The method itself: ``(raw (B, h, w), extras)`` for the given targets."""
