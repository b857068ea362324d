"""Boxes from a COCO-format instance file (``--boxes instances.json``), read with the COCO API
(``pycocotools``), for the pointing game and the localisation metrics of any dataset.

An image of the dataset takes the COCO image whose ``file_name`` its path ends with (a path
relative to the dataset root, or a bare file name); its ``width``/``height`` become the
record's size and each annotation's ``bbox`` (``x, y, w, h``) a box ``(xmin, ymin, xmax,
ymax)`` of the class its category names (:class:`~shapcam.data.labels.LabelMap`). Crowd
annotations are kept as ``difficult``. An image without a label takes the class of its first
annotation, as VOC's reader does. Categories the model does not know are left out, and a file
none of whose categories it knows is an error.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ShapCAMError
from .labels import LabelMap, checked_file
from .records import ImageRecord

#: Bytes a COCO file may have (COCO 2017 train's instances are 450 MB).
MAX_COCO_BYTES = 1 << 30


def load_coco(path: str | Path):
    """The COCO API object of ``path``; a file that is not COCO instances is one error."""
    from pycocotools.coco import COCO

    path = checked_file(path, MAX_COCO_BYTES, "box file")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the API prints its timings
            return COCO(str(path))
    except Exception as exc:  # noqa: BLE001 - not JSON, not a dict, missing keys, ...
        raise ShapCAMError(f"box file {path} is not COCO instances JSON (images, annotations, "
                           f"categories): {type(exc).__name__}: {exc}") from None


def _classes(coco, labels: LabelMap, path: Path) -> dict[int, int]:
    classes = {}
    for cat in coco.loadCats(coco.getCatIds()):
        with contextlib.suppress(ShapCAMError):
            classes[int(cat["id"])] = labels.index(cat.get("name", ""))
    if not classes:
        names = [c.get("name") for c in coco.loadCats(coco.getCatIds())][:5]
        raise ShapCAMError(f"box file {path}: none of its categories ({names}) is a class of "
                           "the model; map them with --class-map FILE.json")
    return classes


def apply_coco(records: Sequence[ImageRecord], path: str | Path, labels: LabelMap) -> int:
    """Give ``records`` the boxes and sizes of the COCO file ``path``; returns how many
    images it annotated."""
    coco = load_coco(path)
    classes = _classes(coco, labels, Path(path))
    by_name: dict[str, list[dict]] = {}
    for img in coco.loadImgs(coco.getImgIds()):
        name = str(img.get("file_name", "")).replace("\\", "/").removeprefix("./")
        by_name.setdefault(posixpath.basename(name), []).append({**img, "file_name": name})
    found = 0
    for rec in records:
        where = str(rec.path).replace("\\", "/")
        match = [i for i in by_name.get(posixpath.basename(where), [])
                 if where.endswith("/" + i["file_name"]) or where == i["file_name"]]
        if len(match) != 1 or rec.error:
            continue
        found += 1
        _annotate(rec, coco, match[0], classes, Path(path))
    return found


def _annotate(rec: ImageRecord, coco, img: dict, classes: dict[int, int], path: Path) -> None:
    try:
        rec.size = (int(img["width"]), int(img["height"]))
    except (KeyError, TypeError, ValueError):
        rec.error = f"{path}: image {img.get('id')} ({img['file_name']}) has no width/height"
        return
    boxes: dict[int, list] = {}
    crowd: dict[int, list] = {}
    first = None
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])):
        cls = classes.get(int(ann.get("category_id", -1)))
        bbox = ann.get("bbox")
        if cls is None or not isinstance(bbox, list) or len(bbox) != 4:
            continue
        x, y, w, h = (float(v) for v in bbox)
        boxes.setdefault(cls, []).append([x, y, x + w, y + h])
        crowd.setdefault(cls, []).append(bool(ann.get("iscrowd", 0)))
        first = cls if first is None else first
    rec.boxes = {c: np.asarray(b, np.float32).reshape(-1, 4) for c, b in boxes.items()}
    rec.difficult = {c: np.asarray(d) for c, d in crowd.items()}
    if rec.label < 0 and first is not None:
        rec.label = first
    rec.labels = tuple(sorted({*([rec.label] if rec.label >= 0 else []), *boxes}))
