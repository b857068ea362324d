"""Gradient-weighted class activation maps: Grad-CAM and Grad-CAM++.

Both weight the target layer's channels ``A^k`` by gradients of the class score ``y^c`` (the
logit, as in pytorch-grad-cam) and return ``ReLU(sum_k w_k A^k)`` at layer resolution. The
gradient is taken through the head only: the trunk ran once, without a graph.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import CAMMethod


def gradcam_weights(grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM's channel weights ``w_k = mean_ij g^k_ij``, ``(B, C)`` from ``g (B, C, h, w)``."""
    return grads.mean((2, 3))


def gradcampp_weights(features: torch.Tensor, grads: torch.Tensor, eps: float = 0.0
                      ) -> torch.Tensor:
    """Grad-CAM++'s channel weights ``w_k = sum_ij alpha^k_ij ReLU(g^k_ij)`` with
    ``alpha = g^2 / (2 g^2 + sum_ab A^k_ab g^3 + eps)`` (0 where ``g = 0``), ``(B, C)``.
    Differentiable in both arguments (the distillation students use it with a graph)."""
    g2, g3 = grads.pow(2), grads.pow(3)
    sum_a = features.sum((2, 3), keepdim=True)
    denom = 2 * g2 + sum_a * g3 + eps
    alpha = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                        torch.zeros_like(grads))
    return (alpha * grads.clamp_min(0)).sum((2, 3))


class GradCAM(CAMMethod):
    """Grad-CAM (Selvaraju et al., ICCV 2017).

    ``w_k = mean_ij dy^c / dA^k_ij``;  ``L = ReLU(sum_k w_k A^k)``.
    """

    name = "gradcam"
    title = "Grad-CAM"

    def gradients(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``dy^c / dA`` for each image's target, ``(B, C, h, w)``."""
        a = features.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.head(a)
            score = logits.gather(1, targets.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, a)
        return grad

    def channel_weights(self, features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return gradcam_weights(grads)

    def raw_maps(self, x: torch.Tensor, targets: torch.Tensor, *, features: torch.Tensor,
                 logits: torch.Tensor, **_: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        grads = self.feature_map(self.gradients(features, targets))
        features = self.feature_map(features)  # ViT: tokens and gradients on the patch grid
        w = self.channel_weights(features, grads)
        cam = torch.einsum("bc,bchw->bhw", w, features).clamp_min(0)
        return cam.detach(), {"weights": w.detach()}


class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018), closed-form alphas.

    With ``g = dy^c / dA^k_ij``:
    ``alpha^kc_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3)`` (0 where ``g = 0``),
    ``w_k = sum_ij alpha^kc_ij ReLU(g)``;  ``L = ReLU(sum_k w_k A^k)``.
    (The exponential-score form of the paper reduces to these powers of the first gradient.)

    Args:
        eps: added to the denominator. 0 (default) is the formula; pytorch-grad-cam adds 1e-6,
            which is not negligible when gradients are ~1e-3 (``g^2 ~ eps``): pass ``eps=1e-6``
            to reproduce its maps.
    """

    name = "gradcampp"
    title = "Grad-CAM++"

    def __init__(self, model, target_layer: str | None = None, *, eps: float = 0.0) -> None:
        super().__init__(model, target_layer)
        self.eps = eps

    def channel_weights(self, features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return gradcampp_weights(features, grads, self.eps)
