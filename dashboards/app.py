"""The Shap-CAM runs dashboard (Streamlit): ``shapcam dashboard --runs DIR``.

Run list -> a run's paper table -> images filtered and sorted -> every method's overlay of one
image side by side, boxes drawn, metrics beside each map; per-class chart; SQL over the tables.
All reads go through :mod:`dashboards.data` (and so through :mod:`storage`).
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import pandas as pd
import streamlit as st
from matplotlib import colormaps
from PIL import Image

from dashboards import data, render
from storage import Run, StorageError
from storage.sandbox import Sandbox

PAGE = 25  # image rows per page of the image table
MAX_DISAGREEMENT = 1000  # images ranked by map disagreement at most (2 maps read per image)
SQL_MAX_ROWS = 10_000  # rows a query shows (the page must stay responsive)
SQL_TIMEOUT = 30.0  # seconds before a query is interrupted
SQL_MAX_BYTES = 32 * 2**20  # bytes of a result kept: wide values are cut here, not in memory


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shapcam dashboard")
    parser.add_argument("--runs", default="runs")
    return parser.parse_args(sys.argv[1:])


@st.cache_data(ttl=20, show_spinner=False)
def _runs(runs_dir: str) -> list[data.RunInfo]:
    return data.list_runs(runs_dir)


@st.cache_data(show_spinner="reading the image table")
def _image_table(path: str, dataset: str, model: str, protocol: str, version: str,
                 slot: int = 0) -> pd.DataFrame:
    return data.image_table(Run(path), dataset, model, protocol, slot)


@st.cache_resource(show_spinner="copying the run's tables for SQL", max_entries=4)
def _sandbox(path: str, version: str) -> Sandbox:
    """One locked-down DuckDB per run and version of its tables, shared by every rerun and
    session (each query runs on its own cursor; only SELECT/EXPLAIN run)."""
    return Run(path).sandbox()


@st.cache_data(show_spinner="comparing maps chunk by chunk")
def _disagreement(path: str, dataset: str, model: str, a: str, b: str,
                  ids: tuple[str, ...], slot: int = 0) -> pd.Series:
    return data.map_disagreement(Run(path), dataset, model, a, b, list(ids), slot=slot)


@st.cache_data(show_spinner=False, max_entries=64)
def _image_view(path: str, version: str, dataset: str, model: str, protocol: str,
                image_id: str, slot: int, _table: pd.DataFrame) -> data.ImageView:
    """One image's maps and photo, read once per run version (``_table``, the image table
    of the other arguments, is not hashed): a widget that does not change the image does
    not read its maps again."""
    return data.image_view(Run(path), dataset, model, image_id, _table)


@st.cache_data(show_spinner=False, max_entries=64)
def _per_class(path: str, version: str, dataset: str, model: str, protocol: str, slot: int,
               metric: str, methods: tuple[str, ...], _table: pd.DataFrame) -> pd.DataFrame:
    return data.per_class(_table, metric, list(methods), data.method_titles(Run(path)))


def stderr_image(stderr: np.ndarray, size: tuple[int, int]) -> Image.Image:
    scaled = stderr / max(float(np.nanmax(stderr)), 1e-12)
    rgb = (255 * colormaps["magma"](np.nan_to_num(scaled))[..., :3]).astype(np.uint8)
    return Image.fromarray(rgb).resize(size, Image.NEAREST)


def run_list(runs_dir: str) -> data.RunInfo | None:
    try:
        runs = _runs(runs_dir)
    except StorageError as exc:
        st.error(str(exc))
        return None
    if not runs:
        st.info(f"No runs in `{runs_dir}` yet. Make one with "
                f"`shapcam run --preset quick --store {runs_dir}`, then reload.")
        return None
    st.subheader("Runs")
    st.dataframe(data.runs_frame(runs), hide_index=True, use_container_width=True)
    labels = [f"{r.run_id} ({r.status})" for r in runs]
    choice = st.sidebar.selectbox("Run", labels, key="run")
    return runs[labels.index(choice)]


def summary(run: Run, dataset: str, model: str, protocol: str, info: data.RunInfo) -> None:
    st.subheader("Summary (the paper's table)")
    try:
        table = data.paper_table(run, dataset, model, protocol)
    except StorageError as exc:
        st.warning(str(exc))
        return
    counts = [r for r in table.index if r.startswith(data.COUNT_ROWS)]
    st.table(table.style.format("{:.3f}", na_rep="n/a")  # small: static HTML
             .format("{:.0f}", na_rep="n/a", subset=pd.IndexSlice[counts, :]))
    st.caption(f"protocol `{protocol}`, preset `{info.preset or 'paper'}`, "
               f"{info.images} images")


def images(run: Run, version: str, dataset: str, model: str, protocol: str, table: pd.DataFrame,
           methods: list[str]) -> None:
    st.subheader("Images")
    titles = data.method_titles(run)
    c1, c2, c3, c4 = st.columns(4)
    classes = sorted(table["label_name"].unique().tolist())
    cls = c1.selectbox("Class", ["(all)", *classes], key="class")
    metric = c2.selectbox("Metric", data.metric_choices(table), key="metric",
                          format_func=lambda k: data.METRICS[k])
    method = c3.selectbox("Method", methods, key="method",
                          format_func=titles.get)
    col = f"{metric}:{method}"
    values = table[col].dropna() if col in table else pd.Series(dtype=float)
    low = high = None
    if len(values) and values.min() < values.max():
        low, high = c4.slider("Range", float(values.min()), float(values.max()),
                              (float(values.min()), float(values.max())), key="range")
    d1, d2, d3 = st.columns([1, 1, 2])
    a = d1.selectbox("Disagreement of", methods, key="dis_a",
                     format_func=titles.get)
    b = d2.selectbox("and", methods, index=min(1, len(methods) - 1), key="dis_b",
                     format_func=titles.get)
    by_disagreement = d3.checkbox("sort by map disagreement (1 - Pearson r)", key="dis_on")
    label = None if cls == "(all)" else int(table.loc[table["label_name"] == cls,
                                                      "label"].iloc[0])
    has = col in table  # no metrics yet (a run in progress): no metric filter
    shown = data.filter_images(table, label=label, metric=metric if has else None,
                               method=method, low=low, high=high,
                               sort_by=col if has else None,
                               descending=metric not in data.LOWER_IS_BETTER)
    shown = shown[shown["complete"]]
    if by_disagreement and a != b and len(shown):
        if len(shown) > MAX_DISAGREEMENT:  # it reads both maps of every image it ranks
            st.caption(f"ranking the first {MAX_DISAGREEMENT} of {len(shown)} images by "
                       "disagreement; narrow the filters to rank them all")
            shown = shown.iloc[:MAX_DISAGREEMENT]
        dis = _disagreement(run.root, dataset, model, a, b, tuple(shown["image_id"]),
                            int(table["slot"].iloc[0]) if "slot" in table else 0)
        shown = shown.assign(disagreement=shown["image_id"].map(dis)).sort_values(
            "disagreement", ascending=False)
    if shown.empty:
        st.info("No image matches these filters (or no shard is complete yet).")
        return
    pages = (len(shown) - 1) // PAGE + 1
    page = st.number_input(f"Page (of {pages}, {len(shown)} images)", 1, pages, 1,
                           key="page")
    rows = shown.iloc[(page - 1) * PAGE: page * PAGE]
    cols = ["image_id", "label_name", "prediction", "probability",
            *[c for c in ("disagreement", col) if c in rows], "error"]
    st.dataframe(rows[cols], hide_index=True, use_container_width=True)
    image_id = st.selectbox("Image", rows["image_id"].tolist(), key="image")
    show_stderr = st.checkbox("Show Shap-CAM's standard-error map", key="stderr")
    image_panel(run, version, dataset, model, protocol, image_id, table, show_stderr)


def image_panel(run: Run, version: str, dataset: str, model: str, protocol: str, image_id: str,
                table: pd.DataFrame, show_stderr: bool) -> None:
    try:
        view = _image_view(str(run.root), version, dataset, model, protocol, image_id,
                           int(table["slot"].iloc[0]), table)
    except StorageError as exc:
        st.error(str(exc))
        return
    titles = data.method_titles(run)
    verb = "explained" if "targets" in table else "predicted"  # topk/present: the slot's class
    st.markdown(f"**{view.image_id}**: label *{view.label}*, {verb} *{view.prediction}* "
                f"(p = {view.probability:.3f}); boxes in green")
    if view.photo_problem:
        st.warning(f"photo not shown: {view.photo_problem}")
    columns = st.columns(len(view.maps) + (1 if show_stderr and view.stderr is not None
                                           else 0))
    for column, (method, _) in zip(columns, view.maps.items(), strict=False):
        column.image(render.overlay(view.photo, view.maps[method], view.boxes.tolist(),
                                    size=view.maps[method].shape[::-1]),
                     caption=titles[method], use_container_width=True)
        m = view.metrics[method]
        field = "".join(f"<br>{k} {v:.3f}" for k, v in m.items()
                        if k not in data.PAPER_METRICS and not math.isnan(v))
        column.markdown(f"<div class='metrics' data-method='{method}'>"
                        f"drop {m['avg_drop']:.2f}<br>incr {m['increase']:.0f}<br>"
                        f"prop {m['proportion']:.3f}<br>del {m['deletion']:.3f}<br>"
                        f"ins {m['insertion']:.3f}{field}</div>", unsafe_allow_html=True)
    if show_stderr and view.stderr is not None:
        h, w = view.maps["shapcam"].shape
        columns[-1].image(stderr_image(view.stderr, (w, h)), use_container_width=True,
                          caption="Shap-CAM standard error (per position)")


def per_class(run: Run, version: str, dataset: str, model: str, protocol: str,
              table: pd.DataFrame, methods: list[str]) -> None:
    st.subheader("Per class")
    metric = st.selectbox("Metric per class", data.metric_choices(table), key="class_metric",
                          format_func=lambda k: data.METRICS[k])
    frame = _per_class(str(run.root), version, dataset, model, protocol,
                       int(table["slot"].iloc[0]), metric, tuple(methods), table)
    if frame.empty:
        st.info("No metric values yet.")
        return
    st.bar_chart(frame.drop(columns="images"), stack=False, horizontal=True)
    st.dataframe(frame, use_container_width=True)


def sql_box(run: Run, version: str) -> None:
    st.subheader("SQL (DuckDB over metrics, manifest, summary)")
    st.caption(f"Read-only: queries see this run's tables and nothing else (no files, URLs, "
               f"extensions or settings); at most {SQL_MAX_ROWS:,} rows, "
               f"{SQL_MAX_BYTES // 2**20} MB, {SQL_TIMEOUT:g} s.")
    with st.form("sql_form"):
        query = st.text_area("Query", "select method, count(*) as images, avg(avg_drop) as "
                             "avg_drop, avg(insertion) as insertion from metrics group by "
                             "method order by method", key="sql")
        submitted = st.form_submit_button("Run query")
    if not submitted:
        return
    st.caption(f"ran: {query}")
    try:
        result = _sandbox(str(run.root), version).query(
            query, max_rows=SQL_MAX_ROWS, max_bytes=SQL_MAX_BYTES, timeout=SQL_TIMEOUT)
    except StorageError as exc:
        st.error(str(exc))
        return
    if result.attrs.get("truncated"):
        st.warning(f"showing the first {len(result):,} rows (at most {SQL_MAX_ROWS:,} rows "
                   f"and {SQL_MAX_BYTES // 2**20} MB)")
    st.dataframe(result, hide_index=True, use_container_width=True)
    st.download_button("Download CSV", result.to_csv(index=False), "query.csv",
                       "text/csv", key="csv")


def main() -> None:
    st.set_page_config(page_title="Shap-CAM runs", layout="wide")
    st.title("Shap-CAM runs")
    runs_dir = _args().runs
    info = run_list(runs_dir)
    if info is None:
        return
    if info.status == "unreadable":
        st.error(f"{info.run_id}: {info.problem}")
        return
    if info.problem:
        st.warning(f"{info.run_id}: {info.problem}")
    run = Run(info.path)
    tables = run.tables()
    if not tables:
        st.info("This run has no tables yet.")
        return
    dataset, model = tables[0]
    if len(tables) > 1:
        pair = st.sidebar.selectbox("Model", [f"{d}/{m}" for d, m in tables], key="table")
        dataset, model = pair.split("/", 1)
    protocols = data.protocols(run) or ["scorecam"]
    protocol = st.sidebar.selectbox("Protocol", protocols, key="protocol")
    methods = data.methods_of(run)
    summary(run, dataset, model, protocol, info)
    slot = 0
    n_slots = data.class_slots(run, dataset, model)
    if n_slots > 1:  # --target topk:K / present: one map per image and class
        slot = st.sidebar.selectbox("Explained class", list(range(n_slots)), key="slot",
                                    format_func=lambda j: f"class {j + 1} of the image's "
                                                          f"{n_slots}")
    version = run.version()  # one listing per rerun: the key of every cached read below
    table = _image_table(info.path, dataset, model, protocol, version, slot)
    tabs = st.tabs(["Images", "Per class", "SQL"])
    with tabs[0]:
        images(run, version, dataset, model, protocol, table, methods)
    with tabs[1]:
        per_class(run, version, dataset, model, protocol, table, methods)
    with tabs[2]:
        sql_box(run, version)


main()
