"""The ``sample`` dataset, the embedded default of dataset runs: six of the bundled photos
(:mod:`shapcam.photos`) laid out as ILSVRC2012 val in the Kaggle localisation layout, so the real
reader reads them.

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

from ..photos import bundled_photo
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
    from ..models import imagenet_categories

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
