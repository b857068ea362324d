"""One image of a dataset, its label and boxes, and how it becomes a model input."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ShapCAMError
from ..zoo.preprocessing import INPUT_SIZE
from .images import load_image, to_tensor


@dataclass
class ImageRecord:
    """An image of a dataset. Boxes are ``(xmin, ymin, xmax, ymax)`` in original pixels.

    ``boxes`` maps a class index to its ``(k, 4)`` boxes; ``label`` is the ground-truth class
    (ILSVRC) or the first object's class (VOC, whose ``labels`` lists all of them).
    ``error`` holds why the record is unusable (missing annotation, unknown synset, ...):
    such a record is reported, not raised, so a dataset run finishes the rest.
    """

    image_id: str
    path: Path | str  # a str for an fsspec URL (shapcam.data.images.location)
    label: int
    boxes: dict[int, np.ndarray] = field(default_factory=dict)
    size: tuple[int, int] | None = None  # (width, height) from the annotation
    labels: tuple[int, ...] = ()
    difficult: dict[int, np.ndarray] = field(default_factory=dict)
    error: str | None = None

    def boxes_of(self, cls: int) -> np.ndarray:
        return self.boxes.get(int(cls), np.zeros((0, 4), dtype=np.float32))


def scale_boxes(boxes: np.ndarray, size: tuple[int, int], out: int = INPUT_SIZE) -> np.ndarray:
    """Boxes from an image of ``size = (width, height)`` into the ``out x out`` resized frame."""
    w, h = size
    scale = np.array([out / w, out / h, out / w, out / h], dtype=np.float32)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * scale


def check_boxes(record: ImageRecord, size: tuple[int, int]) -> None:
    """A box outside the image or with no area is an error naming the file and the box."""
    w, h = size
    for cls, boxes in record.boxes.items():
        for b in np.asarray(boxes).reshape(-1, 4):
            x0, y0, x1, y1 = (float(v) for v in b)
            if not (0 <= x0 < x1 <= w + 1 and 0 <= y0 < y1 <= h + 1):
                raise ShapCAMError(
                    f"{record.path}: box {tuple(round(v, 1) for v in b)} of class {cls} lies "
                    f"outside the {w}x{h} image or has no area")


def load_example(record: ImageRecord, size: int = INPUT_SIZE
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor], tuple[int, int]]:
    """``(x (3, size, size), boxes per class in the size x size frame, original (w, h))``.

    Raises :class:`ShapCAMError` naming the file for a corrupt image, a recorded error, or a box
    outside the image.
    """
    if record.error:
        raise ShapCAMError(record.error)
    image = load_image(record.path)
    if record.size is None and record.boxes:  # boxes without an annotated size (manifests)
        record.size = image.size
    check_boxes(record, image.size)
    boxes = {c: torch.from_numpy(scale_boxes(b, image.size, size)) for c, b in
             record.boxes.items()}
    return to_tensor(image, size), boxes, image.size


def draw_records(records: Sequence[ImageRecord], n: int | None, seed: int = 0
                   ) -> list[ImageRecord]:
    """``n`` records drawn without replacement, deterministic in ``seed`` (sorted by id first,
    so the draw does not depend on file-system order); all of them when ``n`` is None."""
    ordered = sorted(records, key=lambda r: r.image_id)
    if n is None or n >= len(ordered):
        return ordered
    if n < 1:
        raise ShapCAMError(f"n_images must be >= 1, got {n}")
    return sorted(random.Random(seed).sample(ordered, n), key=lambda r: r.image_id)


#: Why an image is in the pointing game or not (the ``pointing`` column of the metrics).
POINTING_STATUSES = ("scored", "no box", "filtered", "unannotated")


def pointing_status(record: ImageRecord, cls: int | None = None, max_area: float = 0.5) -> str:
    """The paper's filter for the pointing game ("images with only one bounding box for target
    class", the box covering less than ``max_area`` of the image) for class ``cls``:
    ``"scored"`` (passes), ``"no box"`` (the image has boxes, none of ``cls``: e.g. a
    misclassified image explained for its predicted class), ``"filtered"`` (several boxes of
    ``cls``, or one too large) or ``"unannotated"`` (no boxes or no image size)."""
    cls = record.label if cls is None else cls
    if not any(len(b) for b in record.boxes.values()) or record.size is None:
        return "unannotated"
    boxes = record.boxes_of(cls)
    if boxes.shape[0] == 0:
        return "no box"
    if boxes.shape[0] != 1:
        return "filtered"
    x0, y0, x1, y1 = boxes[0]
    w, h = record.size
    return "scored" if (x1 - x0) * (y1 - y0) < max_area * w * h else "filtered"


def localisation_filter(record: ImageRecord, cls: int | None = None,
                        max_area: float = 0.5) -> bool:
    """Whether the image enters the pointing game for ``cls``: :func:`pointing_status`."""
    return pointing_status(record, cls, max_area) == "scored"
