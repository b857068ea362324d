"""The ``sample`` dataset, the embedded default of dataset runs: six of the bundled photos
(:mod:`shapcam.data.photos`) laid out as ILSVRC2012 val in the Kaggle localisation layout, so the
real reader reads them.

Labels and boxes were annotated by hand for this project and are committed as ILSVRC XML files
in ``shapcam/data/sample_annotations/`` (boxes are approximate, drawn on a 50-pixel grid). Photos
without a fitting ImageNet-1k class (the motorcycle: ImageNet has only moped/scooter; the
dahlia) are left out.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from PIL import Image

from .photos import bundled_photo
from .readers import imagenet_wnids, parse_xml

#: image id -> bundled photo name
SAMPLE_IMAGES: dict[str, str] = {
    "sample_chelsea": "chelsea",
    "sample_coffee": "coffee",
    "sample_rocket": "rocket",
    "sample_china": "china",
    "sample_grace_hopper": "grace_hopper",
    "sample_astronaut": "astronaut",
}


def default_sample_root() -> Path:
    base = os.environ.get("SHAPCAM_DATA") or Path.home() / ".cache" / "shapcam"
    return Path(base) / "sample-ilsvrc"


def build_sample_dataset(root: str | Path | None = None) -> Path:
    """Write (idempotently) the sample dataset under ``root`` and return ``root``."""
    root = Path(root) if root is not None else default_sample_root()
    images = root / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    annotations = root / "ILSVRC" / "Annotations" / "CLS-LOC" / "val"
    images.mkdir(parents=True, exist_ok=True)
    annotations.mkdir(parents=True, exist_ok=True)
    wnids = imagenet_wnids()
    from ..zoo.models import imagenet_categories

    names = imagenet_categories()
    mapping = root / "LOC_synset_mapping.txt"
    if not mapping.is_file():
        tmp = mapping.with_suffix(".tmp")
        tmp.write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, names, strict=True)))
        tmp.replace(mapping)
    rows = ["ImageId,PredictionString"]
    source = files("shapcam.data").joinpath("sample_annotations")
    for image_id, photo in SAMPLE_IMAGES.items():
        xml_text = source.joinpath(f"{image_id}.xml").read_text()
        xml = annotations / f"{image_id}.xml"
        if not xml.is_file() or xml.read_text() != xml_text:
            xml.write_text(xml_text)
        jpeg = images / f"{image_id}.JPEG"
        if not jpeg.is_file():
            with Image.open(bundled_photo(photo).path) as img:
                tmp = jpeg.with_suffix(".tmp")
                img.convert("RGB").save(tmp, format="JPEG", quality=95)
                tmp.replace(jpeg)
        _, objects = parse_xml(xml)
        rows.append(f"{image_id}," + " ".join(
            f"{name} " + " ".join(str(int(v)) for v in box) for name, box, _ in objects))
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def build_synthetic_dataset(root: str | Path, n: int, seed: int = 0,
                            sizes: tuple[int, int] = (300, 500)) -> Path:
    """``n`` images in the ILSVRC val (Kaggle) layout made from the sample photos: random crops
    (60-100% of each side) and horizontal flips, resized so the long side is a random
    ``sizes[0]..sizes[1]`` pixels (ILSVRC's typical JPEGs), saved as JPEG (quality 90). Each
    keeps its photo's class, and its boxes go through the same crop and flip (clipped; a box
    left with under 10 px per side is dropped, and an image left with none is annotated with
    one box covering it). Deterministic in ``seed``.

    For scale: benchmarks and tests of thousands of real-content images, offline.
    """
    import random

    root = Path(root)
    src = build_sample_dataset(root / ".sources")
    rng = random.Random(seed)
    images = root / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    annotations = root / "ILSVRC" / "Annotations" / "CLS-LOC" / "val"
    images.mkdir(parents=True, exist_ok=True)
    annotations.mkdir(parents=True, exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text((src / "LOC_synset_mapping.txt").read_text())
    photos = {}
    for image_id in SAMPLE_IMAGES:
        with Image.open(src / f"ILSVRC/Data/CLS-LOC/val/{image_id}.JPEG") as img:
            photos[image_id] = (img.convert("RGB"), parse_xml(
                src / f"ILSVRC/Annotations/CLS-LOC/val/{image_id}.xml")[1])
    rows = ["ImageId,PredictionString"]
    for i in range(n):
        base = rng.choice(sorted(photos))
        img, objects = photos[base]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        flip = rng.random() < 0.5
        scale = rng.randint(*sizes) / max(cw, ch)
        out_w, out_h = max(1, round(cw * scale)), max(1, round(ch * scale))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((out_w, out_h), Image.BILINEAR)
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        image_id = f"synth_{i:06d}"
        crop.save(images / f"{image_id}.JPEG", format="JPEG", quality=90)
        kept = []
        for name, box, _ in objects:
            bx0, by0, bx1, by1 = (float(v) for v in box)
            bx0, bx1 = (min(max(bx0 - x0, 0), cw) * scale, min(max(bx1 - x0, 0), cw) * scale)
            by0, by1 = (min(max(by0 - y0, 0), ch) * scale, min(max(by1 - y0, 0), ch) * scale)
            if flip:
                bx0, bx1 = out_w - bx1, out_w - bx0
            if bx1 - bx0 >= 10 and by1 - by0 >= 10:
                kept.append((name, [int(bx0), int(by0), int(bx1), int(by1)]))
        if not kept:  # the crop cut every box: the whole image is the object
            kept = [(objects[0][0], [0, 0, out_w, out_h])]
        (annotations / f"{image_id}.xml").write_text(_ilsvrc_xml(image_id, out_w, out_h, kept))
        rows.append(f"{image_id}," + " ".join(f"{nm} " + " ".join(map(str, b))
                                              for nm, b in kept))
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def _ilsvrc_xml(image_id: str, width: int, height: int,
                objects: list[tuple[str, list[int]]]) -> str:
    parts = [f"<annotation><folder>val</folder><filename>{image_id}</filename>"
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (x0, y0, x1, y1) in objects:
        parts.append(f"<object><name>{name}</name><difficult>0</difficult><bndbox>"
                     f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
                     "</bndbox></object>")
    return "".join(parts) + "</annotation>\n"
