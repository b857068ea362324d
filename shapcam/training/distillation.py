"""Paper Section 4.3 / Table 4: a WRN-16-2 student learns from a WRN-40-2 teacher with an
explanation loss. Ten configurations: cross-entropy only, or plus ``alpha * L_interpret`` with
Grad-CAM, Grad-CAM++, Score-CAM or Shap-CAM maps; each without and with Hinton KD (T = 4).

Teacher maps are precomputed once per method on the un-augmented training images (the engine's
exact methods, no gradients) and given the same random crop and flip as the image at every step;
recomputing them online would cost, per step, one teacher pass per image for Grad-CAM and Shap-CAM
but one per channel and image (128) for Score-CAM. They are kept as one float16 array per method
(``N x 32 x 32``: 100 MB for CIFAR-10's 50,000 images) in the run folder, not in the Zarr saliency
store: the trainer reads them whole every epoch, in its own process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..methods.base import eval_mode
from .cifar import ImageSet, batches
from .losses import interpret_loss, kd_loss
from .maps import student_maps
from .train import Checkpoint, Schedule, fit
from .wrn import WideResNet


@dataclass(frozen=True)
class Variant:
    """One cell of Table 4."""

    method: str | None  # explanation method in the loss; None: cross-entropy only
    kd: bool

    @property
    def name(self) -> str:
        return (self.method or "ce") + ("+kd" if self.kd else "")


METHOD_ROWS = (None, "gradcam", "gradcampp", "scorecam", "shapcam")
VARIANTS = tuple(Variant(m, kd) for m in METHOD_ROWS for kd in (False, True))
#: Table 4 of the paper, test error % (without L_KD, with L_KD), for the README and docs.
PAPER_TABLE4 = {None: (6.78, 5.68), "gradcam": (6.86, 5.80), "gradcampp": (6.74, 5.56),
                "scorecam": (6.75, 5.42), "shapcam": (6.69, 5.37)}


def parse_variants(text: str) -> list[Variant]:
    """``"ce,ce+kd,shapcam+kd"`` or ``"all"`` -> variants."""
    if text.strip() == "all":
        return list(VARIANTS)
    known = {v.name: v for v in VARIANTS}
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item not in known:
            raise ValueError(f"unknown configuration {item!r}; use {', '.join(known)} or all")
        out.append(known[item])
    return out


@dataclass
class LossSettings:
    """``alpha``: weight of L_interpret (not given in the paper; 1.0 is our default).
    ``kd_weight``: weight of L_KD; ``temperature``: Hinton's T (the paper: 4).
    ``permutations``: Shap-CAM orders per step for the student map (unbiased at any K; 16 costs a
    cumsum over 16 x 65 prefixes). ``scorecam_channels``: the Score-CAM channel rule, the same
    for teacher and student (the most varied channels; None: every channel); the student pays
    one detached forward per channel, image and step."""

    alpha: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 4.0
    permutations: int = 16
    scorecam_channels: int | None = 16


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, data: ImageSet, batch_size: int = 500,
                        device: str = "cpu") -> dict[str, float]:
    """Test error % and mean cross-entropy on ``data``'s test split."""
    model.eval()
    wrong, loss, n = 0, 0.0, 0
    for x, y, _, _ in batches(data.test_x, data.test_y, batch_size, seed=0, epoch=0,
                              train=False, device=device):
        logits = model(x)
        wrong += int((logits.argmax(1) != y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    return {"test_error": 100.0 * wrong / n, "test_loss": loss / n}


def train_teacher(model: WideResNet, data: ImageSet, schedule: Schedule, checkpoint: Checkpoint,
                  device: str = "cpu", **fit_kwargs: Any) -> list[dict[str, Any]]:
    """Cross-entropy training (the teacher, and the recipe every student follows)."""
    model.to(device)

    def loss(batch, epoch, step):
        x, y, _, _ = batch
        ce = F.cross_entropy(model(x), y)
        return ce, {"loss": ce.item(), "ce": ce.item()}

    return fit(model, schedule, checkpoint,
               batches=lambda e: batches(data.train_x, data.train_y, schedule.batch_size,
                                         seed=schedule.seed, epoch=e, train=True,
                                         flip=data.flip, device=device),
               loss=loss, evaluate=lambda: evaluate_classifier(model, data, device=device),
               **fit_kwargs)


def train_student(student: WideResNet, teacher: WideResNet, data: ImageSet, variant: Variant,
                  schedule: Schedule, checkpoint: Checkpoint, *,
                  teacher_maps: torch.Tensor | None = None,
                  settings: LossSettings | None = None, device: str = "cpu",
                  **fit_kwargs: Any) -> list[dict[str, Any]]:
    """``CE [+ alpha L_interpret(student map, teacher map)] [+ kd_weight L_KD]``, class = label.

    ``teacher_maps``: ``(N_train, 32, 32)`` from :func:`~shapcam.training.maps.teacher_maps`
    for ``variant.method`` (required when it is not None).
    """
    settings = settings or LossSettings()
    if variant.method and teacher_maps is None:
        raise ValueError(f"{variant.name} needs the teacher's {variant.method} maps")
    student.to(device)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    n_pos = None

    def loss(batch, epoch, step):
        nonlocal n_pos
        x, y, tmap, _ = batch
        parts: dict[str, float] = {}
        if variant.method:
            orders = None
            if variant.method == "shapcam":
                if n_pos is None:  # in eval mode: a train-mode pass would move BN statistics
                    with eval_mode(student), torch.no_grad():
                        n_pos = int(np.prod(student.features(x[:1]).shape[-2:]))
                g = torch.Generator().manual_seed(
                    (schedule.seed * 1_000_003 + epoch) * 100_003 + step)
                orders = torch.rand(settings.permutations, n_pos, generator=g).argsort(1)
            logits, smap = student_maps(student, variant.method, x, y, orders=orders,
                                        max_channels=settings.scorecam_channels)
            li = interpret_loss(smap, tmap.float(), size=x.shape[-1])
            parts["interpret"] = li.item()
        else:
            logits, li = student(x), None
        ce = F.cross_entropy(logits, y)
        total = ce + (settings.alpha * li if li is not None else 0)
        parts["ce"] = ce.item()
        if variant.kd:
            with torch.no_grad():
                t_logits = teacher(x)
            kd = kd_loss(logits, t_logits, settings.temperature)
            total = total + settings.kd_weight * kd
            parts["kd"] = kd.item()
        parts["loss"] = total.item()
        return total, parts

    extra = teacher_maps if variant.method else None
    return fit(student, schedule, checkpoint,
               batches=lambda e: batches(data.train_x, data.train_y, schedule.batch_size,
                                         seed=schedule.seed, epoch=e, train=True,
                                         flip=data.flip, extra=extra, device=device),
               loss=loss, evaluate=lambda: evaluate_classifier(student, data, device=device),
               params=[p for p in student.parameters()], **fit_kwargs)
