"""How results look, in one place: tables as markdown (the terminal and Prefect artifacts) or
HTML (reports), and saliency overlays (the dashboard, the HTML report, ``shapcam explain``).

Plain numpy, PIL and matplotlib: no torch, no Streamlit, so the dashboard, the report tasks and
the command line share it.
"""

from __future__ import annotations

import html as html_lib
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

GREEN = (0, 255, 0)


@dataclass
class Table:
    """A captioned table: ``rows[i][0]`` is the row label, then one cell per column.

    Numbers are shown with ``digits`` decimals, or with ``digits_by_row[label]``; None and
    NaN read ``n/a``; strings are shown as they are. ``notes`` follow the table.
    """

    caption: str
    header: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)
    digits: int = 3
    digits_by_row: dict[str, int] = field(default_factory=dict)

    def cell(self, value: Any, label: str) -> str:
        if isinstance(value, str):
            return value
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{value:.{self.digits_by_row.get(label, self.digits)}f}"

    def cells(self) -> list[list[str]]:
        return [[str(r[0]), *(self.cell(v, str(r[0])) for v in r[1:])] for r in self.rows]


def code_span(text: object) -> str:
    """``text`` as a Markdown code span, inert whatever it holds (backticks, HTML): the
    fence is one backtick longer than the longest run of backticks inside."""
    s = str(text).replace("\n", " ")
    fence = "`" * (max(map(len, re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def markdown(table: Table, heading: str = "") -> str:
    """``heading`` (e.g. ``"### "``) + caption, a blank line, the table, then the notes."""
    lines = [f"{heading}{table.caption}", "", "| " + " | ".join(table.header) + " |",
             "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.cells()]
    lines += [f"\n{note}" for note in table.notes]
    return "\n".join(lines)


def html(table: Table, level: int = 2) -> str:
    """The caption as a heading, the table (row labels as ``th``), the notes as paragraphs."""
    esc = html_lib.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in table.header)
    body = "".join(f"<tr><th>{esc(r[0])}</th>" + "".join(f"<td>{esc(c)}</td>" for c in r[1:])
                   + "</tr>" for r in table.cells())
    notes = "".join(f"<p>{esc(n)}</p>" for n in table.notes)
    return (f"<h{level}>{esc(table.caption)}</h{level}><table><tr>{head}</tr>{body}</table>"
            f"{notes}")


def page(title: str, body: str) -> str:
    """A self-contained HTML page (inline style, images as data URLs)."""
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html_lib.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head>"
            f"<body>{body}</body></html>")


def heatmap(saliency: np.ndarray, size: tuple[int, int], cmap: str = "jet") -> np.ndarray:
    """``saliency`` ((h, w) in [0, 1], NaN as 0) resized bilinearly to ``size = (W, H)`` and
    coloured: ``(H, W, 3)`` floats in [0, 1]."""
    from matplotlib import colormaps

    resized = Image.fromarray(np.nan_to_num(np.asarray(saliency, dtype=np.float32))).resize(
        size, Image.Resampling.BILINEAR)
    return colormaps[cmap](np.clip(np.asarray(resized), 0, 1))[..., :3]


def overlay(photo: np.ndarray | None, saliency: np.ndarray,
            boxes: Sequence[Sequence[float]] = (), size: tuple[int, int] | None = None,
            alpha: float = 0.5) -> Image.Image:
    """The photo (``(H, W, 3)`` uint8; grey when None) blended with the jet-coloured map,
    ``boxes`` (xmin, ymin, xmax, ymax in the photo's pixels) drawn in green."""
    if photo is None:
        w, h = size or saliency.shape[::-1]
        base = np.full((h, w, 3), 0.5, dtype=np.float32)
    else:
        base = np.asarray(photo, dtype=np.float32)[..., :3] / 255
    heat = heatmap(saliency, (base.shape[1], base.shape[0]))
    img = Image.fromarray((255 * ((1 - alpha) * base + alpha * heat)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in (list(map(float, b)) for b in boxes):
        draw.rectangle((x0, y0, x1, y1), outline=GREEN, width=2)
    return img


def png(fig: Any, dpi: int = 80) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def overlay_grid(photos: list[tuple[str, np.ndarray | None]],
                 maps: dict[str, np.ndarray], titles: dict[str, str]) -> bytes:
    """One row per photo: the photo, then each method's overlay (``maps[m][i]``); PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(photos), len(maps) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for i, (image_id, photo) in enumerate(photos):
        if photo is not None:
            axes[i, 0].imshow(photo)
        axes[i, 0].set_title(image_id, fontsize=7, parse_math=False)  # names are data
        for j, (m, stack) in enumerate(maps.items(), start=1):
            axes[i, j].imshow(overlay(photo, stack[i]))
            if i == 0:
                axes[i, j].set_title(titles.get(m, m), fontsize=9, parse_math=False)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


def save_overlay_figure(photo: np.ndarray, saliency: np.ndarray, path: str | Path, title: str,
                        boxes: Sequence[Sequence[float]] = ()) -> Path:
    """Write the overlay of ``saliency`` on ``photo`` with a title and a colour bar to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable

    height, width = photo.shape[:2]
    fig, ax = plt.subplots(figsize=(6, 6 * height / width + 0.6), dpi=100)
    ax.imshow(overlay(photo, saliency, boxes))
    ax.set_title(title, fontsize=10, parse_math=False)
    ax.axis("off")
    fig.colorbar(ScalarMappable(cmap="jet"), ax=ax, fraction=0.046, pad=0.04, label="saliency")
    fig.tight_layout()
    path = Path(path)
    path.write_bytes(png(fig, dpi=100))
    return path
