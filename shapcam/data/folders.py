"""Your data: an image folder (``ImageFolder`` class subfolders, or flat) or a manifest table
(CSV or Parquet), on disk or behind any fsspec URL (``s3://bucket/images``).

- **Folder**: ``root/<class>/**/<image>`` labels each image by its class folder (mapped to the
  model's classes: :class:`~shapcam.data.labels.LabelMap`); images directly in ``root`` have
  no label (the target is then the predicted class).
- **Manifest**: one row per image, or per box: ``path`` (also ``uri``, ``image``, ``file``;
  relative paths are relative to the manifest's folder), optional ``image_id``, ``label``
  (class name or index) and ``xmin, ymin, xmax, ymax`` (with ``box_label``, else the row's
  label). Rows of one path are one image with all their boxes.

A row or an image that cannot be used (unknown label, bad box, empty path) becomes a record
with ``error`` set, reported per image by the run; a missing or unreadable image is found
when it is decoded. Only a table that cannot be read at all is an error of its own.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ShapCAMError
from .images import is_url, location
from .labels import LabelMap
from .records import ImageRecord

#: Files taken as images when a folder is listed (torchvision's ImageFolder list, less PGM).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: Bytes a manifest may have (50,000 rows are a few MB).
MAX_MANIFEST_BYTES = 1 << 30
PATH_COLUMNS = ("path", "uri", "image", "file")
BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")


def _list_images(root: str) -> list[str]:
    """Image files under ``root`` as sorted posix paths relative to it."""
    if is_url(root):
        from fsspec.core import url_to_fs

        try:
            fs, base = url_to_fs(root)
            found = fs.find(base)
        except ImportError as exc:
            raise ShapCAMError(f"cannot list {root}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - credentials, no such bucket, network
            raise ShapCAMError(f"cannot list {root}: {type(exc).__name__}: {exc}") from None
        base = base.rstrip("/")
        rel = [f[len(base):].lstrip("/") for f in found]
    else:
        if not os.path.isdir(root):
            raise ShapCAMError(f"dataset root {root} is not a folder")
        rel = [posixpath.join(Path(d).relative_to(root).as_posix(), f)
               for d, _, files in os.walk(root) for f in files]
    return sorted(r.removeprefix("./") for r in rel if r.lower().endswith(IMAGE_EXTENSIONS))


def _join(root: str, rel: str) -> str | Path:
    return location(root.rstrip("/") + "/" + rel if is_url(root) else Path(root) / rel)


def read_folder(root: str | Path, labels: LabelMap) -> list[ImageRecord]:
    """Records of an image folder (module docstring): ids are the paths relative to ``root``
    without their extension (``tabby/0001``)."""
    root = str(root)
    files = _list_images(root)
    if not files:
        raise ShapCAMError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
    records, seen = [], set()
    for rel in files:
        image_id = posixpath.splitext(rel)[0]
        if image_id in seen:  # a.jpg and a.png: the second keeps its extension
            image_id = rel
        seen.add(image_id)
        rec = ImageRecord(image_id, _join(root, rel), -1)
        folder = rel.split("/")[0] if "/" in rel else None
        if folder is not None:
            try:
                rec.label = labels.index(folder)
                rec.labels = (rec.label,)
            except ShapCAMError as exc:
                rec.error = f"{rec.path}: {exc}"
        records.append(rec)
    return records


def _read_table(path: str) -> Any:
    """The manifest as a DataFrame of strings (CSV) or typed columns (Parquet)."""
    import fsspec
    import pandas as pd

    try:
        with fsspec.open(path, "rb") as fh:
            size = getattr(fh, "size", None) or fh.seek(0, 2)
            if size > MAX_MANIFEST_BYTES:
                raise ShapCAMError(f"manifest {path} is over {MAX_MANIFEST_BYTES >> 20} MB")
            fh.seek(0)
            if path.lower().endswith((".parquet", ".pq")):
                return pd.read_parquet(fh)
            return pd.read_csv(fh, dtype=str, keep_default_na=False)
    except ShapCAMError:
        raise
    except FileNotFoundError:
        raise ShapCAMError(f"manifest {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - not CSV/Parquet, bad encoding, ...
        raise ShapCAMError(f"cannot read manifest {path} as "
                           f"{'Parquet' if path.endswith(('.parquet', '.pq')) else 'CSV'}: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or \
        str(value).strip() == ""


def read_manifest(path: str | Path, labels: LabelMap) -> list[ImageRecord]:
    """Records of a manifest table (module docstring), in the order of their first row."""
    path = str(path)
    table = _read_table(path)
    columns = {c.strip().lower(): c for c in table.columns}
    column = next((columns[c] for c in PATH_COLUMNS if c in columns), None)
    if column is None:
        raise ShapCAMError(f"manifest {path} has no path column ({' or '.join(PATH_COLUMNS)}); "
                           f"its columns: {', '.join(map(str, table.columns)) or 'none'}")
    has_boxes = all(c in columns for c in BOX_COLUMNS)
    base = posixpath.dirname(path) if is_url(path) else str(Path(path).resolve().parent)
    records: dict[str, ImageRecord] = {}
    for n, row in enumerate(table.to_dict("records"), start=2):  # line 1: the header
        image = "" if _blank(row[column]) else str(row[column]).strip()
        if not image:
            rec = ImageRecord(f"row-{n}", location(path), -1,
                              error=f"{path} row {n}: empty {column}")
            records[rec.image_id] = rec
            continue
        full = image if is_url(image) or os.path.isabs(image) else _join(base, image)
        key = str(full)
        if key not in records:
            given = row.get(columns.get("image_id", ""), "")
            rid = str(given).strip() if not _blank(given) else \
                posixpath.splitext(image.split("://")[-1])[0]
            records[key] = ImageRecord(rid, location(full), -1)
        _add_row(records[key], row, columns, labels, has_boxes, f"{path} row {n}")
    out = list(records.values())
    _unique_ids(out, path)
    return out


def _add_row(rec: ImageRecord, row: dict[str, Any], columns: dict[str, str], labels: LabelMap,
             has_boxes: bool, where: str) -> None:
    """One manifest row into its record: the label, a box; a bad value sets ``error``."""
    try:
        label = row.get(columns.get("label", ""), "")
        if not _blank(label) and rec.label < 0:
            rec.label = labels.index(label)
            rec.labels = (rec.label,)
        if has_boxes and not all(_blank(row[columns[c]]) for c in BOX_COLUMNS):
            try:
                box = np.array([float(row[columns[c]]) for c in BOX_COLUMNS], np.float32)
            except (TypeError, ValueError):
                raise ShapCAMError("a box needs four numbers xmin, ymin, xmax, ymax") from None
            owner = row.get(columns.get("box_label", ""), "")
            cls = labels.index(owner) if not _blank(owner) else rec.label
            if cls < 0:
                raise ShapCAMError("a box needs a label or box_label")
            rec.boxes[cls] = np.concatenate([rec.boxes_of(cls), box[None]])
            rec.labels = tuple(sorted({*rec.labels, cls}))
    except ShapCAMError as exc:
        rec.error = rec.error or f"{where}: {exc}"


def _unique_ids(records: list[ImageRecord], path: str) -> None:
    seen: dict[str, str] = {}
    for rec in records:
        if rec.image_id in seen and seen[rec.image_id] != str(rec.path):
            rec.error = rec.error or (f"{path}: image_id {rec.image_id!r} names two images "
                                      f"({seen[rec.image_id]} and {rec.path})")
            rec.image_id = f"{rec.image_id}#{len(seen)}"
        seen.setdefault(rec.image_id, str(rec.path))
