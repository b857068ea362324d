"""The static HTML report of a run: the paper-style tables and, per model, example images with
every method's map side by side (matplotlib figures embedded as PNG)."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np

from shapcam.data import open_dataset
from shapcam.data import sample_records as sample_dataset
from shapcam.evaluate import METHOD_TITLES
from storage import open_run

EXAMPLES = 4


def _figure(images: list[tuple[str, np.ndarray]], maps: dict[str, np.ndarray],
            methods: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows, cols = len(images), len(methods) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for i, (image_id, img) in enumerate(images):
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(image_id, fontsize=7)
        for j, m in enumerate(methods, start=1):
            sal = maps[m][i].astype(np.float32)
            heat = np.asarray(Image.fromarray(np.nan_to_num(sal)).resize(
                (img.shape[1], img.shape[0]), Image.Resampling.BILINEAR))
            axes[i, j].imshow(img)
            axes[i, j].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if i == 0:
                axes[i, j].set_title(METHOD_TITLES.get(m, m), fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _table_html(table: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table["columns"])
    body = []
    for row in table["rows"]:
        cells = "".join(
            "<td>n/a</td>" if v is None or (isinstance(v, float) and math.isnan(v))
            else f"<td>{v:.3f}</td>" for v in row["values"])
        body.append(f"<tr><th>{html.escape(row['metric'])}</th>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(body)}</table>"


def write_report(run_dir: str, config: dict[str, Any], tables: dict[str, Any]) -> str:
    """Write ``<run_dir>/report.html`` (local path or fsspec URL) and return its path."""
    from PIL import Image

    run = open_run(run_dir)
    records = {r.image_id: r for r in sample_dataset(
        open_dataset(config["dataset"], config.get("root"), config.get("split", "test")),
        config.get("n_images"), config.get("seed", 0))}
    sections = [f"<h1>Shap-CAM run {html.escape(str(run_dir).rstrip('/').rsplit('/', 1)[-1])}"
                "</h1>",
                f"<p>dataset <b>{html.escape(config['dataset'])}</b>, protocol "
                f"<b>{html.escape(config.get('protocol', 'scorecam'))}</b>, methods "
                f"{html.escape(', '.join(config['methods']))}</p>"]
    for model, table in tables.items():
        sections.append(f"<h2>{html.escape(model)}</h2>{_table_html(table)}")
        images_df = run.images(config["dataset"], model)
        ok = images_df[images_df["complete"] & (images_df["target"] >= 0)].head(EXAMPLES)
        if ok.empty:
            continue
        ids = ok["image_id"].tolist()
        maps = {m: run.maps(config["dataset"], model, m, ids=ids).values
                for m in config["methods"]}
        pics = []
        for image_id in ids:
            with Image.open(records[image_id].path) as im:
                pics.append((image_id, np.asarray(im.convert("RGB"))))
        sections.append(f'<img alt="maps of {html.escape(model)}" '
                        f'src="data:image/png;base64,{_figure(pics, maps, config["methods"])}">')
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>Shap-CAM report</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head>"
            f"<body>{''.join(sections)}</body></html>")
    from storage.location import Location

    return Location(run_dir).write_bytes(page.encode(), "report.html")
