"""Dashboard page-data loading on a synthetic run of 10,000 images (not a timed test).

    .venv/bin/python benchmarks/bench_dashboard.py [--images 10000] [--shard 100]

Generates a run folder the way the pipeline lays it out (Zarr maps of two methods with CAM-like
maps, per-shard Parquet metrics, summary, manifest, image index, class names), then times what
each dashboard page reads through ``dashboards.data``, cold (fresh ``Run`` objects, first call)
and warm (second call; the app caches the image table). The target is under 2 s per page.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from bench_storage import cam_like

from dashboards import data
from shapcam.data.photos import bundled_photo
from storage import (
    Run,
    SaliencyStore,
    TableSpec,
    write_image_index,
    write_manifest,
    write_metrics_shard,
    write_summary,
)

D, M, METHODS = "imagenet", "vgg16", ("gradcam", "shapcam")


def build(root: Path, n: int, shard: int) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, n)
    ids = [f"ILSVRC2012_val_{i:08d}" for i in range(n)]
    config = {"dataset": D, "models": [{"name": M}], "methods": list(METHODS),
              "preset": "paper"}
    store = SaliencyStore.create(root, "bench", {"config": config})
    store.init_table(D, M, ids, labels.tolist(), TableSpec(n, shard, (224, 224),
                                                           {m: (7, 7) for m in METHODS}),
                     {"categories": [f"class {i}" for i in range(1000)]})
    photo = str(bundled_photo("chelsea").path)
    write_image_index(root, D, [{"image_id": i, "path": photo, "label": int(c),
                                 "labels": [int(c)], "boxes": [], "width": 500,
                                 "height": 375, "error": None}
                                for i, c in zip(ids, labels, strict=True)])
    for k in range(n // shard):
        sl = slice(k * shard, (k + 1) * shard)
        maps = {}
        for j, m in enumerate(METHODS):
            mp, raw = cam_like(shard, 10 * k + j)
            maps[m] = {"maps": mp, "raw": raw} | ({"stderr": np.abs(raw)} if m == "shapcam"
                                                  else {})
        store.write_shard(D, M, k, {"target": labels[sl], "probability": rng.random(shard),
                                    "width": np.full(shard, 500), "height": np.full(shard, 375),
                                    "boxes": np.tile([[10.0, 20, 300, 200]], (shard, 1, 1))},
                          maps)
        for m in METHODS:
            vals = rng.random((shard, 5))
            write_metrics_shard(root, D, M, m, k, [
                {"run_id": "bench", "image_id": ids[i], "target": int(labels[i]),
                 "label": int(labels[i]), "avg_drop": 100 * v[0], "increase": float(v[1] > .5),
                 "proportion": v[2], "deletion": v[3], "insertion": v[4]}
                for i, v in zip(range(sl.start, sl.stop), vals, strict=True)])
    write_summary(root, [{"run_id": "bench", "dataset": D, "model": M, "method": m,
                          "protocol": "scorecam", "metric": metric, "value": 1.0,
                          "images": n} for m in METHODS
                         for metric in ("Average Drop %", "Increase in Confidence %")])
    now = datetime.now(UTC)
    write_manifest(root, [{"run_id": "bench", "status": "completed", "dataset": D, "model": M,
                           "shards_total": n // shard, "shards_done": n // shard, "images": n,
                           "started_at": now, "finished_at": now}])


def page(runs: Path, path: Path, image: str, disagreement: bool) -> dict[str, float]:
    """Seconds of each read one dashboard page makes, in the app's order."""
    t: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        t[name] = now - clock
        clock = now

    data.list_runs(runs)
    lap("run list")
    run = Run(path)
    data.paper_table(run, D, M, "scorecam")
    lap("summary table")
    table = data.image_table(run, D, M, "scorecam")
    lap("image table (10k rows x metrics)")
    shown = data.filter_images(table, label=int(table["label"].iloc[0]), metric="avg_drop",
                               method="shapcam", low=10, sort_by="avg_drop:shapcam")
    lap("filter + sort")
    if disagreement:
        page_ids = table["image_id"].iloc[:25].tolist()
        data.map_disagreement(run, D, M, "gradcam", "shapcam", page_ids)
        lap("disagreement of one page (25 images)")
    data.image_view(run, D, M, image, table)
    lap("one image: maps of every method + photo")
    data.per_class(table, "insertion", list(METHODS))
    lap("per-class chart")
    t["total"] = sum(t.values())
    t["shown"] = len(shown)
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--shard", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dash-"))
    try:
        path = tmp / "runs" / "bench"
        t0 = time.perf_counter()
        build(path, args.images, args.shard)
        print(f"built a {args.images}-image run in {time.perf_counter() - t0:.1f}s "
              f"({sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 1e6:.0f} MB)")
        images = [f"ILSVRC2012_val_{i:08d}" for i in (17, 5003, args.images - 1)]
        runs = [page(tmp / "runs", path, images[r % 3], disagreement=True)
                for r in range(args.repeats)]
        keys = [k for k in runs[0] if k != "shown"]
        print(f"\n| read | first page (cold) | median of {args.repeats} |\n|---|---|---|")
        for k in keys:
            print(f"| {k} | {runs[0][k]:.3f} s | {statistics.median(r[k] for r in runs):.3f} s |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
