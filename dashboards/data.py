"""What the dashboard shows, computed through :mod:`storage`'s query API only.

Every function reads lazily: the run list reads store attributes and manifests; a run's image
table reads the 1-D image arrays and the Parquet metrics; maps are read for the one image on
screen (one Zarr chunk per method), so opening a 50,000-image run loads no map. The functions
are plain (no Streamlit) so they are unit-tested and benchmarked on their own.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from storage import SCHEMA_VERSION, IncompleteShardError, Run, SchemaVersionError, StorageError
from storage.location import Location

#: Per-image metric columns of the metrics table, with what the filters call them.
METRICS = {"avg_drop": "Average Drop % (lower is better)", "increase": "Increase (1 = yes)",
           "proportion": "Proportion (energy in box)", "deletion": "Deletion AUC (lower)",
           "insertion": "Insertion AUC (higher)",
           # the field metrics (shown when the run computed them: shapcam run --metrics)
           "sparseness": "Sparseness (Gini, higher: sparser)",
           "complexity": "Complexity (entropy, lower)",
           "rank_accuracy": "Relevance rank accuracy (higher)",
           "mass_accuracy": "Relevance mass accuracy (higher)",
           "road_morf": "ROAD MoRF accuracy (lower)", "road_lerf": "ROAD LeRF accuracy (higher)",
           "mprt_spearman": "MPRT Spearman (lower: passes)",
           "mprt_ssim": "MPRT SSIM (lower: passes)"}
#: Metrics of which lower values are better (sorted ascending).
LOWER_IS_BETTER = {"avg_drop", "deletion", "complexity", "road_morf", "mprt_spearman",
                   "mprt_ssim"}
PAPER_METRICS = ("avg_drop", "increase", "proportion", "deletion", "insertion")


def metric_choices(table: pd.DataFrame) -> list[str]:
    """The paper's metrics, then the field metrics that have a value in ``table``."""
    def computed(k: str) -> bool:
        return any(c.startswith(f"{k}:") and table[c].notna().any() for c in table.columns)

    return [*PAPER_METRICS, *(k for k in METRICS if k not in PAPER_METRICS and computed(k))]


#: Summary rows that are image counts, not metric values
#: (shapcam.evaluation.evaluate.POINTING_COUNTS).
COUNT_ROWS = "Pointing game:"


@dataclass(frozen=True)
class RunInfo:
    """One row of the run list; ``problem`` says why a run cannot be opened (or is partial)."""

    run_id: str
    path: str
    dataset: str = ""
    models: str = ""
    methods: str = ""
    images: int = 0
    status: str = "unknown"
    created: pd.Timestamp | None = None
    preset: str = ""
    problem: str | None = None


def _created(path: str) -> pd.Timestamp | None:
    try:
        when = Location(path).mtime("maps.zarr", "zarr.json")
    except (OSError, ValueError):
        return None
    if isinstance(when, int | float):
        return pd.Timestamp(when, unit="s", tz="UTC")
    return pd.Timestamp(when) if when is not None else None


def list_runs(runs_dir: str | os.PathLike[str]) -> list[RunInfo]:
    """Every run folder under ``runs_dir`` (a folder or an fsspec URL such as
    ``s3://bucket/runs``; newest first), readable or not."""
    root = Location(runs_dir)
    if not root.isdir():
        raise StorageError(f"runs folder {runs_dir} does not exist; pass the --store folder of "
                           "`shapcam run` (default: ./runs)")
    runs = [_run_info(root.url_of(name)) for name in root.listdir()
            if root.isdir(name, "maps.zarr")]
    return sorted(runs, key=lambda r: (r.created is not None, r.created or pd.Timestamp(0),
                                       r.run_id), reverse=True)


def _run_info(path: str) -> RunInfo:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    try:
        run = Run(path)
        attrs = run.store.attrs
    except SchemaVersionError as exc:
        return RunInfo(name, path, status="unreadable",
                       problem=f"{exc} (this dashboard reads schema version {SCHEMA_VERSION})")
    except StorageError as exc:
        return RunInfo(name, path, status="unreadable", problem=str(exc))
    config = attrs.get("config", {})
    info = {"run_id": attrs.get("run_id", name), "path": path,
            "dataset": config.get("dataset", ""),
            "models": ", ".join(m["name"] for m in config.get("models", [])),
            "methods": ", ".join(config.get("methods", [])), "preset": config.get("preset", "")}
    manifest = _manifest(run)
    if manifest is None:
        done = total = 0
        for dataset, model in run.tables():
            status = run.store.shard_status(dataset, model)
            done, total = done + sum(status.values()), total + len(status)
        images = sum(run.store.table(d, m)[0].n_images for d, m in run.tables()[:1])
        return RunInfo(**info, images=images, status="in progress",
                       created=_created(path),
                       problem=f"still running or stopped: {done} of {total} shards done, no "
                               "manifest yet")
    status = "completed" if (manifest["status"] == "completed").all() else "incomplete"
    problem = None if status == "completed" else (
        f"{int(manifest['shards_done'].sum())} of {int(manifest['shards_total'].sum())} "
        "shards done; resume with `shapcam run --run-id " + info["run_id"] + "`")
    return RunInfo(**info, images=int(manifest["images"].max()), status=status,
                   created=pd.Timestamp(manifest["started_at"].min()), problem=problem)


def _manifest(run: Run) -> pd.DataFrame | None:
    return run.manifest()  # read directly: one small file, no SQL sandbox


def runs_frame(runs: list[RunInfo]) -> pd.DataFrame:
    cols = ["run_id", "dataset", "models", "methods", "images", "status", "created", "preset"]
    return pd.DataFrame([{c: getattr(r, c) for c in cols} for r in runs], columns=cols)


# -- one run --------------------------------------------------------------------------------
def protocols(run: Run) -> list[str]:
    """Protocol variants with a summary in this run (``summary-<protocol>.parquet``)."""
    names = [Path(p).name for p in run.location.glob("summary-*.parquet")]
    return sorted(n.removeprefix("summary-").removesuffix(".parquet") for n in names)


def methods_of(run: Run) -> list[str]:
    return list(run.store.attrs.get("config", {}).get("methods", []))


def method_titles(run: Run) -> dict[str, str]:
    """Method name -> the title the run recorded (its name for runs that predate titles)."""
    recorded = run.store.attrs.get("method_titles", {})
    return {m: recorded.get(m, m) for m in methods_of(run)}


def paper_table(run: Run, dataset: str, model: str, protocol: str) -> pd.DataFrame:
    """The paper's table: one row per metric, one column per method (its stored summary)."""
    methods = methods_of(run)
    if protocol not in protocols(run):
        raise StorageError(f"{run.root} has no {protocol} summary yet (it is written when all "
                           "shards are evaluated)")
    df = run.summary(protocol)  # one small file, read directly
    df = df[(df["dataset"] == dataset) & (df["model"] == model)]
    if df.empty:
        raise StorageError(f"{run.root} has no {protocol} summary for {dataset}/{model}")
    wide = df.pivot_table(index="metric", columns="method", values="value", aggfunc="first",
                          dropna=False)
    order = list(dict.fromkeys(df["metric"]))  # the rows in the order the summary has them
    wide = wide.reindex(index=order, columns=[m for m in methods if m in wide.columns])
    titles = method_titles(run)
    wide.columns = [titles.get(m, m) for m in wide.columns]
    wide.index.name = f"{dataset} / {model} ({protocol})"
    return wide


def categories(run: Run, dataset: str, model: str) -> list[str]:
    """Class names recorded with the table (class indices when the run predates them)."""
    _, group = run.store.table(dataset, model)
    return list(group.attrs.get("categories", []))


def class_slots(run: Run, dataset: str, model: str) -> int:
    """Classes per image of the table (1 unless the run explained topk:K or present)."""
    spec, _ = run.store.table(dataset, model)
    return spec.n_targets


def image_table(run: Run, dataset: str, model: str, protocol: str, slot: int = 0
                ) -> pd.DataFrame:
    """One row per image: id, label, prediction, probability, and ``<metric>:<method>``
    columns for every metric and method (NaN where not applicable or failed). With several
    classes per image: those of class position ``slot`` (``prediction`` is then the explained
    class)."""
    images = run.images(dataset, model, slot)
    images["slot"] = slot
    images["row"] = np.arange(len(images))  # position in the store's arrays
    names = categories(run, dataset, model)

    def name(i: int) -> str:
        return names[i] if 0 <= i < len(names) else str(i)

    images["label_name"] = [name(int(i)) for i in images["label"]]
    images["prediction"] = [name(int(i)) if i >= 0 else "" for i in images["target"]]
    try:
        m = run.metrics(filters=[("dataset", "=", dataset), ("model", "=", model),
                                 ("protocol", "=", protocol)],
                        columns=["image_id", "method", "error", "target", *METRICS])
    except StorageError:
        m = pd.DataFrame(columns=["image_id", "method", "error", "target", *METRICS])
    if "targets" in images and not m.empty:  # the rows of this slot's class (or errors)
        want = m["image_id"].map(dict(zip(images["image_id"], images["target"], strict=True)))
        m = m[(m["target"] == want) | m["error"].notna()]
    if not m.empty:
        wide = m.pivot_table(index="image_id", columns="method", values=list(METRICS),
                             aggfunc="first", dropna=False)
        wide.columns = [f"{metric}:{method}" for metric, method in wide.columns]
        images = images.merge(wide, how="left", left_on="image_id", right_index=True)
        errors = m.dropna(subset=["error"]).groupby("image_id")["error"].first()
        images["error"] = images["image_id"].map(errors)
    else:
        images["error"] = None
    return images


def map_disagreement(run: Run, dataset: str, model: str, a: str, b: str,
                     ids: list[str] | None = None, size: int = 28, slot: int = 0) -> pd.Series:
    """``1 - Pearson r`` between the maps of methods ``a`` and ``b`` per image, on maps
    average-pooled to ``size x size``; read chunk by chunk (dask), only for ``ids``; ``slot``:
    which class of multi-target runs."""
    import dask.array as da

    def pooled(method: str):
        arr = run.maps(dataset, model, method, ids=ids, slot=slot).data.astype(np.float32)
        f = arr.shape[-1] // size
        return da.coarsen(np.mean, arr, {1: f, 2: f}, trim_excess=True).reshape(
            arr.shape[0], -1)

    x, y = pooled(a), pooled(b)
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    num = (x * y).sum(axis=1)
    den = da.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    r = da.where(den > 0, num / da.where(den > 0, den, 1), 0.0).compute()
    chosen = ids if ids is not None else run.images(dataset, model)["image_id"].tolist()
    return pd.Series(1.0 - r, index=chosen, name=f"disagreement {a} vs {b}")


def filter_images(table: pd.DataFrame, *, label: int | None = None,
                  metric: str | None = None, method: str | None = None,
                  low: float | None = None, high: float | None = None,
                  sort_by: str | None = None, descending: bool = True) -> pd.DataFrame:
    """Rows of ``table`` with ``label``, ``metric:method`` within [low, high], sorted."""
    out = table
    if label is not None:
        out = out[out["label"] == label]
    if metric and method:
        col = f"{metric}:{method}"
        if col not in out:
            raise StorageError(f"no column {col}; this run has "
                               f"{', '.join(c for c in out.columns if ':' in c)}")
        if low is not None:
            out = out[out[col] >= low]
        if high is not None:
            out = out[out[col] <= high]
    if sort_by:
        out = out.sort_values(sort_by, ascending=not descending, na_position="last")
    return out


def per_class(table: pd.DataFrame, metric: str, methods: list[str],
              titles: dict[str, str] | None = None, top: int | None = 20) -> pd.DataFrame:
    """Mean of ``metric`` per class (rows, most frequent classes first) and method (columns,
    named by ``titles``)."""
    cols = [f"{metric}:{m}" for m in methods if f"{metric}:{m}" in table]
    if not cols:
        return pd.DataFrame()
    g = table.groupby("label_name")
    out = g[cols].mean()
    out.columns = [(titles or {}).get(c.split(":", 1)[1], c.split(":", 1)[1]) for c in cols]
    out["images"] = g.size()
    out = out.sort_values("images", ascending=False)
    return out.head(top) if top else out


@dataclass
class ImageView:
    """Everything the per-image panel draws: photo, boxes in the map frame, maps, metrics."""

    image_id: str
    label: str
    prediction: str
    probability: float
    photo: np.ndarray | None  # (H, W, 3) uint8 in the map frame; None when unreadable
    photo_problem: str | None
    boxes: np.ndarray  # (k, 4) xmin ymin xmax ymax, map frame
    maps: dict[str, np.ndarray]  # method -> (H, W) in [0, 1]
    stderr: np.ndarray | None  # Shap-CAM's standard error at layer resolution
    metrics: dict[str, dict[str, float]]  # method -> metric -> value


def image_view(run: Run, dataset: str, model: str, image_id: str,
               table: pd.DataFrame) -> ImageView:
    """Read one image's maps (one chunk per method) and its photo."""
    row = table[table["image_id"] == image_id]
    if row.empty:
        raise StorageError(f"image {image_id!r} is not in {dataset}/{model}")
    row = row.iloc[0]
    maps: dict[str, np.ndarray] = {}
    stderr = None
    for method in methods_of(run):
        try:
            slot = int(row.get("slot", 0))
            maps[method] = np.asarray(run.maps(dataset, model, method, ids=[image_id],
                                               images=table, slot=slot).values[0],
                                      dtype=np.float32)
            if method == "shapcam":
                stderr = np.asarray(run.maps(dataset, model, method, ids=[image_id],
                                             variable="stderr", images=table,
                                             slot=slot).values[0])
        except IncompleteShardError as exc:
            raise StorageError(f"{image_id}: {exc}") from exc
    H, W = next(iter(maps.values())).shape if maps else (224, 224)
    try:
        photo, problem = run.photo(dataset, image_id, (W, H)), None
    except StorageError as exc:
        photo, problem = None, str(exc)
    boxes = np.zeros((0, 4), dtype=np.float32)
    if row["width"] > 0 and row["height"] > 0:
        _, group = run.store.table(dataset, model)
        raw = np.asarray(group["images"]["boxes"][int(row["row"])], dtype=np.float32)
        raw = raw[~np.isnan(raw).any(axis=1)]
        boxes = raw * np.array([W / row["width"], H / row["height"]] * 2, dtype=np.float32)
    metrics = {m: {k: _float(row.get(f"{k}:{m}")) for k in METRICS} for m in maps}
    return ImageView(image_id, row["label_name"], row["prediction"],
                     float(row["probability"]), photo, problem, boxes, maps, stderr, metrics)


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan

