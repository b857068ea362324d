"""The layers around the compute at ILSVRC size: a synthetic 50,000-image x 6-method run built
through the pipeline's own functions, then every read path timed (not a timed test).

    .venv/bin/python benchmarks/bench_scale.py [--images 50000] [--shard-size auto|N]
        [--keep DIR] [--metrics-only]

Builds an ILSVRC-layout folder (``build_synthetic_dataset``: small JPEGs with XML boxes),
``plan_run`` on it (the real store, tables and image index), then per shard what
``process_shard`` writes (``SaliencyStore.write_shard`` with CAM-like raw maps and RISE-like
maps, ``write_metrics_shard`` per method; no saliency compute), then the run's end
(``aggregate``, ``write_report``, ``write_run_manifest``). Then it times: ``Run.sql`` of a
group-by and its peak memory (a child process), ``aggregate``, the flow's resume work on the
finished run (``plan_run`` + ``complete_shards`` + the run's end), the dashboard in
Streamlit's ``AppTest`` (first page, a widget change, another image, a SQL query), ``verify``,
and the store's size. docs/benchmarks.md records the numbers with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from shapcam.data.sample_dataset import build_synthetic_dataset
from storage import open_run, write_metrics_shard
from storage.derive import maps_from_raw
from storage.verify import verify_run
from tasks.config import RunConfig
from tasks.pipeline import aggregate, complete_shards, plan_run, write_run_manifest
from tasks.reports import write_report

REPO = Path(__file__).resolve().parents[1]
METHODS = ("gradcam", "gradcampp", "scorecam", "rise", "mask", "shapcam")
GROUP_BY = ("select method, count(*) as n, avg(avg_drop) as drop, avg(insertion) as ins "
            "from metrics group by method order by method")


def shard_outputs(records: list[dict], spec, rng: np.random.Generator):
    """What ``process_shard`` writes for one shard: image arrays, maps, metrics rows."""
    n = len(records)
    images = {"target": rng.integers(0, 1000, n), "probability": rng.random(n),
              "width": np.full(n, 500), "height": np.full(n, 375)}
    methods = {}
    for m in METHODS:
        h, w = spec.raw_shapes[m]
        raw = rng.standard_normal((n, 7, 7)).astype(np.float32)
        if (h, w) == spec.map_shape:  # RISE: a smooth map with noise, at input resolution
            # in the range of real RISE maps (0.47..0.62 on the sample photos, 8000 masks);
            # still less compressible than those (73 KB of map and raw per image measured)
            smooth = maps_from_raw(raw, spec.map_shape).astype(np.float32)
            raw = 0.47 + 0.15 * smooth + 0.001 * rng.standard_normal(smooth.shape,
                                                                     dtype=np.float32)
        elif (h, w) != (7, 7):
            raw = rng.random((n, h, w)).astype(np.float32)
        methods[m] = {"raw": raw, "maps": maps_from_raw(raw, spec.map_shape)}
        if m in spec.stderr_methods:
            methods[m]["stderr"] = np.abs(raw) * 0.1
    rows = [{"run_id": "scale", "image_id": r["image_id"], "target": int(t), "label": r["label"],
             "y": float(p), "o": float(p) * 0.5, "avg_drop": float(d), "increase": float(d < 20),
             "proportion": float(p), "pointing": "scored", "deletion": 0.1, "insertion": 0.5,
             "seconds": 0.01, "evaluations": 0, "error": None}
            for r, t, p, d in zip(records, images["target"], images["probability"],
                                  100 * rng.random(n), strict=True)]
    return images, methods, rows


def build_run(run_dir: str, config: RunConfig, metrics_only: bool = False) -> dict:
    plan = plan_run(run_dir, "scale", config)
    from storage import SaliencyStore

    store = SaliencyStore(run_dir)
    spec = store.table(config.dataset, config.models[0].name)[0]
    rng = np.random.default_rng(0)
    started = datetime.now(UTC)
    for k, records in enumerate(plan["shards"]):
        images, methods, rows = shard_outputs(records, spec, rng)
        if metrics_only:  # the completion record alone: the metrics and resume paths
            images, methods = {}, {}
        store.write_shard(config.dataset, config.models[0].name, k, images, methods,
                          record={"failures": {}})
        for m in METHODS:
            write_metrics_shard(run_dir, config.dataset, config.models[0].name, m, k, rows)
    tables = aggregate(run_dir, config)
    write_report(run_dir, config, tables)
    write_run_manifest(run_dir, "scale", config, plan, started)
    return plan


def timed(what: str, fn, results: dict) -> object:
    cpu0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    results[what] = (time.perf_counter() - t0, time.process_time() - cpu0)
    print(f"{what:<48} {results[what][0]:8.2f} s wall {results[what][1]:8.2f} s CPU",
          flush=True)
    return out


_CHILD = """
import json, re, sys, time
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1]) / 1024
{imports}
base, t, cpu = hwm(), time.perf_counter(), time.process_time()
{body}
print(time.perf_counter() - t, time.process_time() - cpu, base, hwm())
"""


def child(imports: str, body: str, *args: str) -> tuple[float, ...]:
    """Wall s, CPU s, RSS after the imports and peak RSS (MB) of ``body`` run in a fresh
    process (VmHWM: ru_maxrss would keep the forking parent's peak across exec)."""
    code = _CHILD.format(imports=imports, body=body)
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.split()
    return tuple(float(x) for x in out[-4:])


def report_child(what: str, numbers: tuple[float, ...]) -> None:
    wall, cpu, base, peak = numbers
    print(f"{what:<48} {wall:8.2f} s wall {cpu:8.2f} s CPU; RSS {base:.0f} MB after imports, "
          f"peak {peak:.0f} MB (+{peak - base:.0f})", flush=True)


def dashboard(runs: str, results: dict) -> None:
    from streamlit.testing.v1 import AppTest

    sys.argv = ["app.py", "--runs", runs]
    at = AppTest.from_file(str(REPO / "dashboards" / "app.py"), default_timeout=600)
    timed("dashboard: first page", at.run, results)
    metric = next(s for s in at.selectbox if s.key == "class_metric")
    timed("dashboard: a widget change (rerun)", lambda: metric.select_index(1).run(), results)
    image = next(s for s in at.selectbox if s.key == "image")
    timed("dashboard: another image", lambda: image.select_index(3).run(), results)
    at.text_area(key="sql").input(GROUP_BY)
    timed("dashboard: SQL group-by (first: builds the sandbox)",
          lambda: at.button[0].click().run(), results)
    timed("dashboard: SQL group-by again", lambda: at.button[0].click().run(), results)
    assert not at.exception, at.exception


def cli_config(data: Path, shard_size: int | None) -> RunConfig:
    """The config ``shapcam run --dataset imagenet --root DATA --no-causal`` makes (so that the
    command resumes the synthetic run: see ``resume_command``)."""
    from flows.cli.runs import RUN_OPTIONS, run_config

    options = {name: default for name, _, default in RUN_OPTIONS}
    return run_config({**options, "dataset": "imagenet", "root": str(data), "causal": False,
                       "methods": ",".join(METHODS), "shard_size": shard_size,
                       "workers": 2})


def resume_command(data: Path, runs: Path, shard_size: str, results: dict) -> None:
    """``shapcam run`` again on the finished run, end to end: its local Prefect server, the
    flow, the Dask cluster it starts, the run's end. Twice: the first command on a new
    ``PREFECT_HOME`` also creates Prefect's database (once per machine)."""
    cmd = [sys.executable, "-c", "from flows.cli import app; app()", "run", "--dataset",
           "imagenet", "--root", str(data), "--store", str(runs), "--run-id", "scale",
           "--methods", ",".join(METHODS), "--no-causal", "--workers", "2",
           *([] if shard_size == "auto" else ["--shard-size", shard_size])]
    home = runs.parent / "prefect"
    for what in ("resume: `shapcam run` again, new Prefect home", "resume: `shapcam run` again"):
        out = timed(what, lambda: subprocess.run(
            cmd, capture_output=True, text=True, cwd=runs.parent, env={
                **os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(home)}), results)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert "shards were already done" in out.stdout + out.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--shard-size", default="auto")
    parser.add_argument("--keep", type=Path, default=None, help="build (or reuse) here")
    parser.add_argument("--metrics-only", action="store_true",
                        help="write no maps (completion records and metrics only): the "
                             "query, aggregate and resume paths at small shard sizes")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    data, runs = work / "data", work / "runs"
    run_dir = str(runs / "scale")
    config = cli_config(data, None if args.shard_size == "auto" else int(args.shard_size))
    results: dict = {}
    try:
        if not (data / "LOC_val_solution.csv").exists():
            timed("dataset folder (not timed against anything)",
                  lambda: build_synthetic_dataset(data, args.images, sizes=(64, 96)), results)
        if not (runs / "scale" / "manifest.parquet").exists():
            timed("build the run (plan + write every shard + end)",
                  lambda: build_run(run_dir, config, args.metrics_only), results)
        run = open_run(run_dir)
        shards = len(run.images("imagenet", "mobilenet_v2")["shard"].unique())
        print(f"{args.images} images x {len(METHODS)} methods, {shards} shards", flush=True)
        for what, q in (("Run.sql group-by (own process)", GROUP_BY),
                        ("Run.sql select * from manifest (own process)",
                         "select * from manifest")):
            report_child(what, child("from storage import open_run",
                                     "open_run(sys.argv[1]).sql(sys.argv[2])", run_dir, q))
        report_child("aggregate (own process)", child(
            "from tasks.config import RunConfig\nfrom tasks.summary import aggregate",
            "aggregate(sys.argv[1], RunConfig.from_dict(json.loads(sys.argv[2])))", run_dir,
            json.dumps(config.to_dict())))

        def resume() -> None:  # what the flow does on a finished run, minus Prefect and Dask
            plan = plan_run(run_dir, "scale", config)
            assert len(complete_shards(run_dir, config, len(plan["shards"]))) == shards
            tables = aggregate(run_dir, config)
            write_report(run_dir, config, tables)
            write_run_manifest(run_dir, "scale", config, plan, datetime.now(UTC))

        timed("resume of the finished run (flow body)", resume, results)
        resume_command(data, runs, args.shard_size, results)
        if args.metrics_only:
            return
        dashboard(str(runs), results)
        report = timed("verify", lambda: verify_run(run_dir), results)
        assert report.ok, report.problems[:3]
        files = [p for p in (runs / "scale").rglob("*") if p.is_file()]
        zarr_bytes = sum(p.stat().st_size for p in files if "maps.zarr" in p.parts)
        print(f"store: {sum(p.stat().st_size for p in files) / 1e9:.2f} GB in {len(files):,} "
              f"files (maps.zarr {zarr_bytes / 1e9:.2f} GB, "
              f"{zarr_bytes / args.images / 1e3:.0f} KB per image)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
