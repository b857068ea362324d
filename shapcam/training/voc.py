"""Fine-tuning an ImageNet classifier on PASCAL VOC 2007 (20 classes, multi-label BCE) and its
mean average precision, so that VOC runs explain a model that knows VOC's classes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageRecord, load_example
from ..data.readers import VOC_CLASSES
from ..zoo.models import load_model
from .train import Checkpoint, Schedule, fit


def replace_classifier(model: nn.Module, classes: int) -> nn.Linear:
    """Swap the last Linear layer for a fresh one with ``classes`` outputs; return it."""
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    new = nn.Linear(last.in_features, classes)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)
    return new


def voc_batches(records: Sequence[ImageRecord], batch_size: int, seed: int, epoch: int,
                train: bool, device: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, multi-hot y)`` batches; training batches are shuffled and flipped by
    ``(seed, epoch)`` alone, so a resumed epoch sees the same batches."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(records), generator=g).tolist() if train else list(
        range(len(records)))
    for s in range(0, len(order), batch_size):
        chunk = [records[i] for i in order[s:s + batch_size]]
        x = torch.stack([load_example(r)[0] for r in chunk])
        if train:
            flip = torch.rand(len(chunk), generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y = torch.zeros(len(chunk), len(VOC_CLASSES))
        for i, r in enumerate(chunk):
            y[i, list(r.labels)] = 1.0
        yield x.to(device), y.to(device)


@torch.no_grad()
def voc_map(model: nn.Module, records: Sequence[ImageRecord], device: str = "cpu",
            batch_size: int = 16) -> dict[str, float]:
    """Mean over classes (with a positive) of the average precision, and the mean BCE."""
    from sklearn.metrics import average_precision_score

    model.eval()
    scores, targets = [], []
    for x, y in voc_batches(records, batch_size, 0, 0, False, device):
        scores.append(model(x).float().cpu())
        targets.append(y.cpu())
    s, t = torch.cat(scores), torch.cat(targets)
    aps = [average_precision_score(t[:, c].numpy(), s[:, c].numpy())
           for c in range(t.shape[1]) if t[:, c].any()]
    return {"test_map": 100.0 * float(np.mean(aps)) if aps else math.nan,
            "test_loss": float(F.binary_cross_entropy_with_logits(s, t))}


def finetune(model_name: str, weights: str, train: Sequence[ImageRecord],
             test: Sequence[ImageRecord], schedule: Schedule, checkpoint: Checkpoint, *,
             device: str = "cpu", on_epoch: Callable[[dict[str, Any]], None] | None = None
             ) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Fine-tune torchvision's ``model_name`` (``weights``) on ``train`` with a new 20-class
    layer and BCE; mAP on ``test`` after every epoch. Resumes from ``checkpoint``."""
    model = load_model(model_name, weights).model
    replace_classifier(model, len(VOC_CLASSES))
    model.to(device)

    def loss(batch, epoch, step):
        x, y = batch
        bce = F.binary_cross_entropy_with_logits(model(x), y)
        return bce, {"loss": bce.item(), "bce": bce.item()}

    history = fit(model, schedule, checkpoint,
                  batches=lambda e: voc_batches(train, schedule.batch_size, schedule.seed, e,
                                                True, device),
                  loss=loss, evaluate=lambda: voc_map(model, test, device), on_epoch=on_epoch)
    return model, history


def save_voc_weights(model: nn.Module, model_name: str, path: Path) -> Path:
    """A state dict with VOC's class names, loadable by ``--models NAME:PATH``."""
    torch.save({"state_dict": model.state_dict(), "categories": list(VOC_CLASSES),
                "num_classes": len(VOC_CLASSES), "model": model_name}, path)
    return path
