"""Reports of a run: the paper's table (terminal, markdown artifacts, HTML) and the static
``report.html`` with example images and every method's map side by side.

Photos are found through the run's image index, so a report needs the store and the photos, not
the dataset reader. Rendering is :mod:`dashboards.render`, shared with the dashboard.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from dashboards import render
from shapcam.evaluation.evaluate import POINTING_COUNTS
from storage import StorageError, open_run
from storage.errors import storage_errors
from storage.location import Location

from .config import RunConfig

EXAMPLES = 4  # images per model in report.html


def paper_table(table: dict[str, Any], caption: str) -> render.Table:
    """A summary table of :func:`shapcam.evaluation.evaluate.summary_table` (metrics as rows,
    methods as columns) with the pointing game's image counts and the seconds-per-image row;
    AUCs with 3 decimals, the rest with 2."""
    rows = [[r["metric"], *r["values"]] for r in table["rows"]]
    for label, key in POINTING_COUNTS:
        if key in table:
            rows.append([label, *(str(n) for n in table[key].values())])
    if "seconds_per_image" in table:
        rows.append(["seconds per image", *table["seconds_per_image"].values()])
    return render.Table(caption, ["metric", *table["columns"]], rows, digits=2,
                        digits_by_row={r["metric"]: 3 for r in table["rows"]
                                       if "AUC" in r["metric"]})


def caption(config: RunConfig, model: str, images: int | None = None) -> str:
    count = f" ({images} images)" if images is not None else ""
    return (f"{config.dataset} / {model}{count}, protocol `{config.protocol}`, preset "
            f"`{config.preset}`")


def tables_markdown(config: RunConfig, tables: dict[str, Any]) -> str:
    """Every model's paper table as markdown (the flow's artifact and log)."""
    return "\n\n".join(render.markdown(paper_table(t, caption(config, m)), heading="### ")
                       for m, t in tables.items())


def _examples(run_dir: str, config: RunConfig, model: str) -> str | None:
    """The overlay grid of up to EXAMPLES explained images of ``model`` as an ``<img>``."""
    run = open_run(run_dir)
    images = run.images(config.dataset, model)
    ok = images[images["complete"] & (images["target"] >= 0)].head(EXAMPLES)
    if ok.empty:
        return None
    ids = ok["image_id"].tolist()
    # the image table and the image index read once for every method and photo
    maps = {m: run.maps(config.dataset, model, m, ids=ids, slot=0, images=images).values
            for m in config.methods}  # the first class of each image
    index = run.image_index(config.dataset)
    photos = []
    for image_id in ids:
        try:
            photos.append((image_id, run.photo(config.dataset, image_id, index=index)))
        except StorageError:  # moved or unreadable: the maps alone
            photos.append((image_id, None))
    titles = run.store.attrs.get("method_titles", {})
    grid = base64.b64encode(render.overlay_grid(photos, maps, titles)).decode()
    return f'<img alt="maps of {html.escape(model)}" src="data:image/png;base64,{grid}">'


def write_report(run_dir: str, config: RunConfig, tables: dict[str, Any]) -> str:
    """Write ``<run_dir>/report.html`` (local path or fsspec URL) and return its path."""
    name = str(run_dir).rstrip("/").rsplit("/", 1)[-1]
    sections = [f"<h1>Shap-CAM run {html.escape(name)}</h1>",
                f"<p>dataset <b>{html.escape(config.dataset)}</b>, protocol "
                f"<b>{html.escape(config.protocol)}</b>, preset <b>"
                f"{html.escape(config.preset)}</b>, methods "
                f"{html.escape(', '.join(config.methods))}</p>"]
    for model, table in tables.items():
        sections.append(render.html(paper_table(table, model)))
        examples = _examples(run_dir, config, model)
        if examples:
            sections.append(examples)
    page = render.page("Shap-CAM report", "".join(sections))
    with storage_errors(f"{run_dir}/report.html"):  # a full disk: one line, nothing half-written
        return Location(run_dir).write_bytes(page.encode(), "report.html")

