"""Explanation maps for the distillation loss: the teacher's without gradients (the engine's
methods, exactly), the student's differentiable with respect to its parameters.

All maps are of the last feature map ``A`` (``features``) of a ``features -> GAP -> FC`` model,
for class ``c`` = the ground-truth label, at layer resolution, ReLU'd. How each student map is
made differentiable:

- Grad-CAM / Grad-CAM++: the gradient ``dy^c/dA`` is taken with ``create_graph=True``, and the
  engine's own channel-weight formulas are applied to it, so the map is a differentiable
  function of the student's weights (second-order terms included).
- Shap-CAM: the permutation estimate is a linear combination of head outputs on masked
  features, ``phi_p = 1/K sum_k [v(P_k(p) + p) - v(P_k(p))]`` with ``v(S) = softmax(W mean(A 1_S)
  + b)_c``. For GAP + FC the masked logits along an order are ``b + cumsum`` of per-position
  terms ``W A_p / n`` (the engine's exact fast path), so K orders cost one cumsum: cheap and
  differentiable through ``A``, ``W`` and ``b``.
- Score-CAM: its weights need one forward pass per channel and image. The student's weights
  ``s_k = softmax(f(x M_k))_c`` are computed in eval mode without gradients (detached), with
  the teacher's channel rule (``max_channels``: the channels of largest spatial variance, Faster
  Score-CAM's selection, the others get 0; None: every channel), and the map
  ``ReLU(sum_k s_k A^k)`` is differentiable through the activations ``A``. Differentiating
  through the masked forwards would multiply the cost of a step by ``max_channels`` backward
  passes; the weights change slowly with the parameters, the activations carry the spatial
  structure the loss compares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..methods import build_method
from ..methods.base import eval_mode
from ..methods.gradcam import gradcam_weights, gradcampp_weights
from ..methods.perturbation import ScoreCAM
from .wrn import WideResNet

STUDENT_METHODS = ("gradcam", "gradcampp", "scorecam", "shapcam")
_SCORERS: dict[tuple[int, int | None], ScoreCAM] = {}


def _scorer(model: WideResNet, max_channels: int | None) -> ScoreCAM:
    """One ScoreCAM per student (building one traces the model); ``id`` keys are checked
    against the model itself, since ids are reused after a model is freed."""
    key = (id(model), max_channels)
    scorer = _SCORERS.get(key)
    if scorer is None or scorer.model is not model:
        if len(_SCORERS) >= 4:
            _SCORERS.clear()
        scorer = _SCORERS[key] = ScoreCAM(model, "features", max_channels=max_channels)
    return scorer


def shapley_gap_fc(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   targets: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Permutation-sampling Shapley values of every position for a GAP + FC head,
    ``(B, h, w)``, differentiable. ``orders``: ``(K, n)`` orders of the ``n = h w`` positions,
    shared by the batch; masked positions are 0 (the engine's zero baseline)."""
    B, C, h, w = features.shape
    n = h * w
    K = orders.shape[0]
    terms = torch.einsum("bcn,oc->bno", features.reshape(B, C, n), weight) / n  # (B, n, out)
    ordered = terms[:, orders]  # (B, K, n, out)
    z0 = bias if bias is not None else torch.zeros(weight.shape[0], device=features.device)
    prefix = torch.cat([z0.expand(B, K, 1, -1), z0 + ordered.cumsum(2)], dim=2)  # (B,K,n+1,o)
    v = prefix.softmax(-1).gather(-1, targets.view(B, 1, 1, 1).expand(B, K, n + 1, 1))[..., 0]
    marginal = v[:, :, 1:] - v[:, :, :-1]  # (B, K, n): contribution of the t-th player
    phi = torch.zeros(B, K, n, dtype=marginal.dtype, device=features.device)
    phi = phi.scatter(2, orders.to(features.device).expand(B, K, n), marginal)
    return phi.mean(1).reshape(B, h, w)


def student_maps(model: WideResNet, method: str, x: torch.Tensor, targets: torch.Tensor, *,
                 orders: torch.Tensor | None = None, max_channels: int = 8
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, map (B, h, w))`` for the student: one forward pass, the map differentiable
    in the student's parameters (see the module docstring for each method)."""
    A = model.features(x)
    logits = model.head(A)
    if method in ("gradcam", "gradcampp"):
        score = logits.gather(1, targets.view(-1, 1)).sum()
        (g,) = torch.autograd.grad(score, A, create_graph=True)
        w = gradcam_weights(g) if method == "gradcam" else gradcampp_weights(A, g)
        return logits, torch.einsum("bc,bchw->bhw", w, A).clamp_min(0)
    if method == "shapcam":
        if orders is None:
            raise ValueError("shapcam student maps need orders (K, h*w)")
        phi = shapley_gap_fc(A, model.fc.weight, model.fc.bias, targets, orders)
        return logits, phi.clamp_min(0)
    if method == "scorecam":
        scorer = _scorer(model, max_channels)
        # masked forwards must neither update nor use BatchNorm batch statistics
        with eval_mode(model), torch.no_grad():
            _, extras = scorer.raw_maps(x, targets, features=A.detach(), logits=logits.detach())
        return logits, torch.einsum("bc,bchw->bhw", extras["weights"], A).clamp_min(0)
    raise ValueError(f"unknown explanation method {method!r}; use one of "
                     f"{', '.join(STUDENT_METHODS)}")


@torch.no_grad()
def teacher_maps(model: WideResNet, method: str, images: torch.Tensor, targets: torch.Tensor,
                 *, batch_size: int = 256, size: int = 32, **options) -> torch.Tensor:
    """The engine's ``method`` maps of ``model`` at ``features`` for ``targets``, upsampled to
    ``size x size`` (``(N, size, size)``, float16), computed once for un-augmented images."""
    cam = build_method(method, model, options, target_layer="features")
    out = []
    for s in range(0, len(targets), batch_size):
        x, t = images[s:s + batch_size], targets[s:s + batch_size]
        kwargs = {"seeds": list(range(s, s + len(t)))} if method == "shapcam" else {}
        raw = cam(x, t, **kwargs).raw.float().clamp_min(0)
        out.append(F.interpolate(raw.unsqueeze(1), size=(size, size), mode="bilinear",
                                 align_corners=False)[:, 0].half())
    return torch.cat(out)
