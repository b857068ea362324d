"""Which classes an image is explained for: ``--target predicted|label|topk:K|present``.

- ``predicted`` (the paper): the model's top class;
- ``label``: the ground-truth class of the record;
- ``topk:K``: the model's ``K`` most probable classes, each explained (and scored) on its own;
- ``present``: every class of the image's annotation (the VOC multi-label case: all object
  classes; ILSVRC: its one class), each explained on its own.

With more than one class per image, every method gives one map and one metrics row per
(image, class); the rows' ``target`` column says which class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.records import ImageRecord
from ..errors import ShapCAMError

KINDS = ("predicted", "label", "topk:K", "present")


@dataclass(frozen=True)
class TargetSpec:
    """A parsed ``--target``: ``kind`` in predicted, label, topk, present; ``k`` for topk."""

    kind: str = "predicted"
    k: int = 1

    @classmethod
    def parse(cls, text: str) -> TargetSpec:
        text = str(text).strip()
        if text in ("predicted", "label", "present"):
            return cls(text)
        head, _, k = text.partition(":")
        if head == "topk":
            if not k.isdigit() or int(k) < 1:
                raise ShapCAMError(f"--target {text!r}: topk needs a count >= 1, e.g. topk:3")
            return cls("topk", int(k))
        raise ShapCAMError(f"unknown --target {text!r}; use one of {', '.join(KINDS)}")

    @property
    def multiple(self) -> bool:
        """Whether an image can have more than one class to explain."""
        return self.kind == "present" or (self.kind == "topk" and self.k > 1)

    def __str__(self) -> str:
        return f"topk:{self.k}" if self.kind == "topk" else self.kind

    def slots(self, records: Sequence[ImageRecord]) -> int:
        """Classes per image at most (the store's class axis): K for topk, the most annotated
        classes of one record for present, else 1."""
        if self.kind == "topk":
            return self.k
        if self.kind == "present":
            return max((len(annotated(r)) for r in records), default=1) or 1
        return 1

    def classes(self, logits: torch.Tensor, records: Sequence[ImageRecord]
                ) -> list[list[int] | str]:
        """Per image, its classes to explain, or the one-line reason it has none."""
        n_classes = logits.shape[1]
        if self.kind == "topk" and self.k > n_classes:
            raise ShapCAMError(f"--target topk:{self.k}: the model has only {n_classes} classes")
        out: list[list[int] | str] = []
        top = logits.topk(min(self.k, n_classes), dim=1).indices.tolist()
        for rec, ranked in zip(records, top, strict=True):
            if self.kind in ("predicted", "topk"):
                out.append(ranked[: self.k])
                continue
            classes = [rec.label] if self.kind == "label" else annotated(rec)
            bad = [c for c in classes if not 0 <= c < n_classes]
            if not classes or bad:
                out.append(f"{rec.image_id}: --target {self}: "
                           + (f"class {bad[0]} is not one of the model's {n_classes}" if bad
                              else "the image has no annotated class"))
            else:
                out.append(classes)
        return out


def annotated(record: ImageRecord) -> list[int]:
    """Every class of a record's annotation: its labels, the classes of its boxes, its label."""
    return sorted(set(record.labels) | {c for c, b in record.boxes.items() if len(b)}
                  | ({record.label} if record.label >= 0 else set()))
