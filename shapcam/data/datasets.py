"""Datasets by name: the bundled ``sample`` set, ILSVRC2012 val, PASCAL VOC 2007, and yours
(an image ``folder`` or a ``manifest`` table), each optionally with COCO-format boxes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import ShapCAMError
from .coco import apply_coco
from .folders import read_folder, read_manifest
from .images import is_url
from .labels import LabelMap
from .readers import read_ilsvrc, read_voc
from .records import ImageRecord
from .sample_dataset import build_sample_dataset

DATASETS = ("sample", "imagenet", "voc", "folder", "manifest")
#: Datasets whose labels are names, mapped to the model's classes.
OWN_DATASETS = ("folder", "manifest")


def open_dataset(name: str, root: str | Path | None = None, split: str = "test", *,
                 categories: Sequence[str] | None = None, boxes: str | Path | None = None,
                 class_map: str | Path | None = None) -> list[ImageRecord]:
    """``sample`` (the bundled photos), ``imagenet``, ``voc``, ``folder`` (``root``: a folder
    or URL) or ``manifest`` (``root``: a CSV/Parquet file or URL).

    ``categories``: the model's class names, to which folder names, manifest labels and COCO
    categories are mapped (with ``class_map``, a JSON file of name -> class); ``boxes``: a
    COCO instances file whose boxes and sizes annotate the images.
    """
    if name == "sample":
        records = read_ilsvrc(build_sample_dataset(root))
    elif root is None:
        raise ShapCAMError(f"dataset {name!r} needs --root")
    elif name in ("imagenet", "ilsvrc"):
        records = read_ilsvrc(root)
    elif name == "voc":
        records = read_voc(root, split)
    elif name in OWN_DATASETS:
        labels = LabelMap(categories, class_map)
        records = (read_folder if name == "folder" else read_manifest)(root, labels)
    else:
        raise ShapCAMError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    if boxes is not None:
        if is_url(boxes):
            raise ShapCAMError(f"--boxes {boxes}: give a local COCO file")
        apply_coco(records, boxes, LabelMap(categories, class_map))
    return records
