"""The student's loss: ``L = CE + alpha * L_interpret [+ kd_weight * L_KD]``.

``L_interpret`` compares the student's map of class ``c`` (the ground-truth label) with the
teacher's map of the same class and image: both are brought to the input resolution (bilinear),
flattened and divided by their L2 norm, and the loss is the squared L2 distance of the unit
vectors, averaged over the batch (attention transfer's normalisation, Zagoruyko & Komodakis,
ICLR 2017). It lies in [0, 2] for non-negative maps (0: same shape, 2: disjoint support), does
not depend on the scale of either map, and is differentiable where a map is not all zero (an
all-zero map contributes a constant).
``L_KD`` is Hinton et al.'s ``T^2 KL(softmax(t / T) || softmax(s / T))`` with ``T = 4``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unit_maps(maps: torch.Tensor, size: int | None = None, eps: float = 1e-12) -> torch.Tensor:
    """``(B, h, w)`` -> ``(B, size * size)`` of unit L2 norm (0 for an all-zero map)."""
    if size is not None and maps.shape[-1] != size:
        maps = F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear",
                             align_corners=False)[:, 0]
    flat = maps.flatten(1).float()
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(eps)


def interpret_loss(student: torch.Tensor, teacher: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Mean over the batch of ``|| s / |s| - t / |t| ||^2`` at ``size x size``."""
    return (unit_maps(student, size) - unit_maps(teacher, size)).pow(2).sum(1).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 4.0) -> torch.Tensor:
    """Hinton's distillation loss, scaled by ``T^2`` so its gradients match CE's magnitude."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1),
                    reduction="batchmean") * t * t
