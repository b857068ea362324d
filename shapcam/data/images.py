"""Reading images from disk or any fsspec URL (``s3://``, ``gs://``, ``https://``,
``memory://``) into preprocessed batches, with clear errors."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ShapCAMError
from ..zoo.preprocessing import INPUT_SIZE, preprocess

#: Pixels an input image may have: checked from its header, before it is decoded (a 140 KB
#: PNG can declare 12000 x 12000 pixels and take gigabytes once decoded).
MAX_PIXELS = 100_000_000
#: Bytes an image file behind a URL may have: read at most this much.
MAX_BYTES = 256 * 2**20


def is_url(path: str | Path) -> bool:
    """Whether ``path`` names a file through fsspec (``scheme://...``) rather than on disk."""
    return "://" in str(path)


def location(path: str | Path) -> str | Path:
    """A record's image location: a URL stays a string (``Path`` would fold its ``//``)."""
    return str(path) if is_url(path) else Path(path)


def _url_bytes(url: str) -> io.BytesIO:
    import fsspec

    try:
        with fsspec.open(url, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ShapCAMError(f"image file {url} does not exist") from None
    except ImportError as exc:  # e.g. s3fs, gcsfs or aiohttp not installed
        raise ShapCAMError(f"cannot read {url}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - network, permissions, bad bucket: per image
        raise ShapCAMError(f"cannot read {url}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if len(data) > MAX_BYTES:
        raise ShapCAMError(f"{url} is over {MAX_BYTES // 2**20} MB: not read")
    return io.BytesIO(data)


def load_image(path: str | Path) -> Image.Image:
    """Open an image file (a path or an fsspec URL) as RGB; a missing, unreadable or
    non-image file, or one over :data:`MAX_PIXELS`, is a clear error."""
    if is_url(path):
        source: io.BytesIO | Path = _url_bytes(str(path))
    else:
        source = path = Path(path)
        if not path.exists():
            raise ShapCAMError(f"image file {path} does not exist")
        if not path.is_file():
            raise ShapCAMError(f"{path} is not a file; pass image files (JPEG, PNG, ...)")
    try:
        with Image.open(source) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ShapCAMError(f"{path} has {img.width} x {img.height} pixels, over the "
                                   f"budget of {MAX_PIXELS:,}: downscale it first")
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ShapCAMError(f"{path} is not a readable image ({exc}); pass a JPEG, PNG, BMP, "
                           "TIFF or WebP file") from exc


def to_tensor(image: Image.Image | np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """Preprocess one PIL image or ``(H, W, 3)`` uint8 array into ``(3, size, size)``."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ShapCAMError(f"expected an (H, W, 3) uint8 array, got {image.shape} "
                               f"{image.dtype}")
        image = Image.fromarray(image)
    return preprocess(image, size)


def load_batch(paths: Sequence[str | Path], size: int = INPUT_SIZE
               ) -> tuple[torch.Tensor, list[Image.Image]]:
    """Preprocessed batch ``(B, 3, size, size)`` and the original RGB images."""
    images = [load_image(p) for p in paths]
    return torch.stack([to_tensor(img, size) for img in images]), images
