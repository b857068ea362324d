"""Overlay figures: the image, the saliency heatmap on top, a colorbar and a title."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def save_overlay(image: Image.Image, saliency: np.ndarray, path: str | Path, title: str,
                 *, alpha: float = 0.5, cmap: str = "jet",
                 boxes: list[tuple[float, float, float, float]] | None = None) -> Path:
    """Write ``image`` with ``saliency`` ((H, W) in [0, 1], any size) overlaid to ``path``.

    The map is resized to the image (the paper resizes images to 224 x 224 without cropping,
    so the map covers the whole photo). ``boxes`` are drawn in original pixel coordinates.
    """
    width, height = image.size
    heat = Image.fromarray(np.asarray(saliency, dtype=np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR)
    fig, ax = plt.subplots(figsize=(6, 6 * height / width + 0.6), dpi=100)
    ax.imshow(image)
    shown = ax.imshow(np.asarray(heat), cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
    for xmin, ymin, xmax, ymax in boxes or []:
        ax.add_patch(plt.Rectangle((xmin, ymin), xmax - xmin, ymax - ymin, fill=False,
                                   edgecolor="white", linewidth=2))
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="saliency")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
