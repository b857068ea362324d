"""Evaluation protocols of the Shap-CAM paper, batched in torch on the model's device.

Inputs are preprocessed batches ``x`` (ImageNet-normalised, ``(B, 3, H, W)``) and saliency maps
``maps`` in [0, 1] at input size ``(B, H, W)``. Perturbations are made on the [0, 1] RGB image
and the result is normalised again before the model sees it. Each function names its protocol
variant; results carry it so tables never mix variants.

- Average Drop % and Increase in Confidence % (Chattopadhyay et al. 2018):
  ``Y`` = softmax probability of class ``c`` on the image, ``O`` = on the explanation image,
  ``drop_i = 100 * max(0, Y_i - O_i) / Y_i`` (averaged: Average Drop), ``increase_i = O_i > Y_i``
  (``100 * mean``: Increase in Confidence). Explanation image, by variant:
  ``scorecam`` (the Shap-CAM paper, after Score-CAM): keep the top 50% of saliency pixels (the
  others are 0), multiply the [0, 1] image by that map, normalise;
  ``gradcampp``: multiply the [0, 1] image by the full map, normalise.
- Energy-based pointing game (Wang et al. 2020): ``sum(L inside the boxes of c) / sum(L)``.
- Deletion / insertion AUC (Petsiuk et al. 2018): pixels are removed (inserted) in decreasing
  saliency order, ``step`` per step; deletion replaces them by 0 (black), insertion starts from
  a Gaussian-blurred image (kernel 11, sigma 5) and restores them; the score is the softmax
  probability of ``c`` after each step; AUC by the trapezoidal rule on [0, 1]. Pixels of equal
  saliency (the zero plateaus of ReLU'd maps) are taken in a seeded random order, not row by
  row: raster order would delete the top of the image first and bias sparse maps' AUCs.
"""


from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapCAMError
from ..runtime.cpu import forward_batch
from ..zoo.preprocessing import denormalize, normalize

Variant = Literal["scorecam", "gradcampp"]
VARIANTS: tuple[str, ...] = ("scorecam", "gradcampp")


def _probabilities(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                   batch_size: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            logits = model(x[s:s + batch_size]).float()
            out.append(logits.softmax(1).gather(1, targets[s:s + batch_size].view(-1, 1)))
    return torch.cat(out).squeeze(1)


def keep_top_fraction(maps: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    """Zero all but the ``ceil(fraction * H * W)`` highest pixels of each map (exactly that many:
    ties are broken by position, so a constant map keeps exactly half)."""
    B = maps.shape[0]
    flat = maps.reshape(B, -1)
    k = math.ceil(fraction * flat.shape[1])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    # A stable sort breaks ties by position whatever the thread count (topk does not).
    keep.scatter_(1, flat.argsort(dim=1, descending=True, stable=True)[:, :k], True)
    return (flat * keep).view_as(maps)


def explanation_images(x: torch.Tensor, maps: torch.Tensor, variant: Variant) -> torch.Tensor:
    """The normalised explanation images of a protocol variant (see the module docstring)."""
    if variant not in VARIANTS:
        raise ShapCAMError(f"unknown protocol variant {variant!r}; use one of {VARIANTS}")
    if maps.shape != (x.shape[0], *x.shape[-2:]):
        raise ShapCAMError(f"maps of shape {tuple(maps.shape)} do not match images "
                           f"{tuple(x.shape)}; expected {(x.shape[0], *x.shape[-2:])}")
    weight = keep_top_fraction(maps) if variant == "scorecam" else maps
    return normalize(denormalize(x) * weight.unsqueeze(1).to(x.dtype))


def average_drop(y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Per-image drop in %: ``100 * max(0, Y - O) / Y``."""
    return 100 * (y - o).clamp_min(0) / y


def increase_in_confidence(y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Per-image indicator ``O > Y`` (its mean times 100 is Increase in Confidence %)."""
    return o > y


def confidence_metrics(model: nn.Module, x: torch.Tensor, maps: torch.Tensor,
                       targets: torch.Tensor, variant: Variant = "scorecam",
                       batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Per-image ``Y``, ``O``, ``avg_drop`` (%) and ``increase`` (bool) for one variant."""
    targets = targets.to(x.device).long()
    batch_size = forward_batch(x.device, batch_size)
    y = _probabilities(model, x, targets, batch_size)
    o = _probabilities(model, explanation_images(x, maps.to(x.device), variant), targets,
                       batch_size)
    return {"y": y, "o": o, "avg_drop": average_drop(y, o),
            "increase": increase_in_confidence(y, o)}


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(H, W)`` bool: pixels whose centre lies in any box ``(xmin, ymin, xmax, ymax)``.

    Rows are y and columns are x: ``mask[row, col]`` is pixel ``(x=col, y=row)``.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    cy = torch.arange(height, dtype=torch.float32, device=boxes.device) + 0.5
    cx = torch.arange(width, dtype=torch.float32, device=boxes.device) + 0.5
    inside_y = (cy.view(1, -1) >= boxes[:, 1:2]) & (cy.view(1, -1) <= boxes[:, 3:4])  # (k, H)
    inside_x = (cx.view(1, -1) >= boxes[:, 0:1]) & (cx.view(1, -1) <= boxes[:, 2:3])  # (k, W)
    return (inside_y.unsqueeze(2) & inside_x.unsqueeze(1)).any(0)


def energy_pointing_game(maps: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per image, the proportion of the map's energy inside its boxes (NaN if no box or if the
    map is all zero). ``boxes[i]`` is ``(k, 4)`` in the map's pixel frame."""
    B, H, W = maps.shape
    if len(boxes) != B:
        raise ShapCAMError(f"got boxes for {len(boxes)} images and {B} maps")
    out = torch.full((B,), float("nan"), device=maps.device)
    for i, b in enumerate(boxes):
        b = torch.as_tensor(b, dtype=torch.float32, device=maps.device).reshape(-1, 4)
        total = maps[i].sum()
        if b.shape[0] == 0 or total <= 0:
            continue
        out[i] = (maps[i] * box_mask(b, H, W)).sum() / total
    return out


def gaussian_blur(x: torch.Tensor, kernel: int = 11, sigma: float = 5.0,
                  border: Literal["zeros", "reflect"] = "zeros") -> torch.Tensor:
    """Separable ``kernel``-tap Gaussian blur. ``zeros``: RISE's insertion substrate (zero
    padding, as RISE); ``reflect``: cv2.GaussianBlur's default border (Mask's substrate)."""
    t = torch.arange(kernel, dtype=x.dtype, device=x.device) - (kernel - 1) / 2
    g = torch.exp(-t**2 / (2 * sigma**2))
    g = g / g.sum()
    C, r = x.shape[1], kernel // 2
    if border == "reflect":
        x = F.pad(x, (r, r, r, r), mode="reflect")
        pad_x, pad_y = (0, 0), (0, 0)
    else:
        pad_x, pad_y = (0, r), (r, 0)
    out = F.conv2d(x, g.view(1, 1, 1, -1).expand(C, 1, 1, -1), padding=pad_x, groups=C)
    return F.conv2d(out, g.view(1, 1, -1, 1).expand(C, 1, -1, 1), padding=pad_y, groups=C)


def saliency_order(maps: torch.Tensor, seeds: Sequence[int] | int = 0) -> torch.Tensor:
    """Pixel indices of each map in decreasing saliency, ``(B, H * W)``; ties are broken by a
    random permutation seeded per image (``seeds``: one per image, or one for all), so the
    order depends on the map and the seed only, not on the pixel's position."""
    B = maps.shape[0]
    flat = maps.reshape(B, -1)
    seeds = [seeds] * B if isinstance(seeds, int) else list(seeds)
    if len(seeds) != B:
        raise ShapCAMError(f"got {len(seeds)} seeds for {B} maps")
    perms = torch.stack([torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(
        int(s))) for s in seeds]).to(flat.device)
    # sorting the shuffled values stably keeps equal values in the shuffled order
    return perms.gather(1, flat.gather(1, perms).argsort(dim=1, descending=True, stable=True))


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoidal area under ``curve (..., T + 1)`` sampled evenly on [0, 1]."""
    n = curve.shape[-1] - 1
    return (curve.sum(-1) - (curve[..., 0] + curve[..., -1]) / 2) / n


#: The frame in which deletion/insertion steps are stated (the paper's input).
STEP_FRAME = 224


def step_in_frame(step: int, size: int) -> int:
    """A deletion/insertion step of ``step`` pixels at :data:`STEP_FRAME` x STEP_FRAME, for a
    ``size`` x ``size`` frame: scaled by area, so a curve keeps its number of steps (224
    pixels: 224 steps at 224; 5 pixels and 205 steps at 32; 399 pixels at 299)."""
    return max(1, round(step * size * size / (STEP_FRAME * STEP_FRAME)))


def causal_curves(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                  mode: Literal["deletion", "insertion"], step: int = 224,
                  batch_size: int | None = None, seeds: Sequence[int] | int = 0
                  ) -> torch.Tensor:
    """Probability of the target after each step: ``(B, ceil(H * W / step) + 1)``; ``seeds``
    break ties in the saliency order (:func:`saliency_order`)."""
    if mode not in ("deletion", "insertion"):
        raise ShapCAMError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    B, _, H, W = x.shape
    n_steps = math.ceil(H * W / step)
    x01 = denormalize(x)
    if mode == "deletion":
        start, finish = x01, torch.zeros_like(x01)
    else:
        start, finish = gaussian_blur(x01), x01
    # rank[p] = position of pixel p in decreasing saliency order
    order = saliency_order(maps, seeds)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(H * W, device=x.device).expand(B, -1))
    rank = rank.view(B, 1, H, W)
    curves = torch.empty(B, n_steps + 1, device=x.device)
    per = forward_batch(x.device, batch_size)
    with torch.no_grad():
        for b in range(B):
            for s in range(0, n_steps + 1, per):
                t = torch.arange(s, min(n_steps + 1, s + per), device=x.device)
                changed = rank[b] < (t * step).view(-1, 1, 1, 1)  # (m, 1, H, W)
                imgs = torch.where(changed, finish[b], start[b])
                logits = model(normalize(imgs)).float()
                curves[b, s:s + t.numel()] = logits.softmax(1)[:, int(targets[b])]
    return curves


def deletion_insertion(model: nn.Module, x: torch.Tensor, maps: torch.Tensor,
                       targets: torch.Tensor, step: int = 224, batch_size: int | None = None,
                       seeds: Sequence[int] | int = 0) -> dict[str, torch.Tensor]:
    """Per-image deletion and insertion AUC (lower deletion, higher insertion is better);
    ``seeds`` (per image, or one for all) break ties in the saliency order."""
    targets = targets.to(x.device).long()
    maps = maps.to(x.device)
    return {mode: auc(causal_curves(model, x, maps, targets, mode, step, batch_size, seeds))
            for mode in ("deletion", "insertion")}
