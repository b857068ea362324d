"""Labels given by name (a class folder, a manifest's ``label``, a COCO category) mapped to the
model's class indices: by a class-map file, else by the model's class names, else as indices.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ShapCAMError

#: Bytes a class-map file may have (a map of 21k ImageNet classes is about 1 MB).
MAX_CLASS_MAP_BYTES = 16 * 2**20


def _key(name: str) -> str:
    return name.strip().lower().replace("_", " ")


class LabelMap:
    """Names -> class indices of a model with ``categories``.

    A name resolves, in order, through ``class_map`` (a JSON object ``{name: index or class
    name}``), the model's class names (case, spaces and underscores ignored), ImageNet synset
    ids (``n01440764``) when the model has the 1000 ImageNet classes, and integers
    ``0..classes-1``.
    """

    def __init__(self, categories: Sequence[str] | None, class_map: str | Path | None = None
                 ) -> None:
        self.categories = list(categories or [])
        self._by_name = {_key(c): i for i, c in enumerate(self.categories)}
        if len(self.categories) == 1000:
            from .readers import imagenet_wnids

            self._by_name.update({w: i for i, w in enumerate(imagenet_wnids())})
        self._explicit: dict[str, Any] = read_class_map(class_map) if class_map else {}
        self.source = f" (class map {class_map})" if class_map else ""

    def index(self, name: Any) -> int:
        """The class of ``name``; :class:`ShapCAMError` naming it and what would work."""
        text = str(name).strip()
        if text in self._explicit:
            text = str(self._explicit[text])
        n = len(self.categories)
        if _key(text) in self._by_name:
            return self._by_name[_key(text)]
        if text.lstrip("-").isdigit() and (not n or 0 <= int(text) < n):
            return int(text)
        close = difflib.get_close_matches(_key(text), list(self._by_name), n=3, cutoff=0.6)
        hint = f"closest: {', '.join(close)}; " if close else ""
        raise ShapCAMError(f"label {text!r} is not a class of the model{self.source} ({n} "
                           f"classes; {hint}map it with --class-map FILE.json)")


def checked_file(path: str | Path, max_bytes: int, what: str) -> Path:
    """``path`` when it is a file of at most ``max_bytes`` (a user's file is read whole:
    memory stays bounded); else one error naming ``what`` it is."""
    path = Path(path)
    if not path.is_file():
        raise ShapCAMError(f"{what} {path} does not exist")
    if path.stat().st_size > max_bytes:
        raise ShapCAMError(f"{what} {path} is over {max_bytes >> 20} MB")
    return path


def read_class_map(path: str | Path) -> dict[str, Any]:
    """A class-map file: a JSON object of ``name: class index or class name``."""
    path = checked_file(path, MAX_CLASS_MAP_BYTES, "class map")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShapCAMError(f"class map {path} is not JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, int | str) and not isinstance(v, bool)
                                             for v in data.values()):
        raise ShapCAMError(f"class map {path} must be a JSON object of name: class index or "
                           'class name, e.g. {"tabby": 281, "dog": "golden retriever"}')
    return {str(k): v for k, v in data.items()}
