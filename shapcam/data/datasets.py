"""Datasets by name: the bundled ``sample`` set, ILSVRC2012 val and PASCAL VOC 2007."""

from __future__ import annotations

from pathlib import Path

from ..errors import ShapCAMError
from .readers import read_ilsvrc, read_voc
from .records import ImageRecord
from .sample_dataset import build_sample_dataset

DATASETS = ("sample", "imagenet", "voc")


def open_dataset(name: str, root: str | Path | None = None, split: str = "test"
                 ) -> list[ImageRecord]:
    """``sample`` (the bundled photos), ``imagenet`` or ``voc``."""
    if name == "sample":
        return read_ilsvrc(build_sample_dataset(root))
    if root is None:
        raise ShapCAMError(f"dataset {name!r} needs --root")
    if name in ("imagenet", "ilsvrc"):
        return read_ilsvrc(root)
    if name == "voc":
        return read_voc(root, split)
    raise ShapCAMError(f"unknown dataset {name!r}; use sample, imagenet or voc")
