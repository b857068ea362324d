"""Orchestration overhead and scaling of `shapcam run` against the plain loop `shapcam evaluate`.

    .venv/bin/python benchmarks/bench_orchestration.py [--images 1000] [--threads 2]

The dataset: ``--images`` images in the ILSVRC (Kaggle) layout made from the sample photos
(random crops and flips, long side 300-500 px: ``build_synthetic_dataset``). Methods: Grad-CAM
and Shap-CAM (default K); metrics without deletion/insertion. Every command runs as a user runs
it (one process each, model loading included), one after the other on an otherwise idle
machine. The plain loop is timed at several compute batch sizes and the best one is the anchor;
the flow runs with that batch size and the same number of threads, against one Prefect server
started beforehand (its start-up is its own line); its time includes starting and stopping its
local Dask cluster. Each row also reports the CPU seconds of the command's processes (the CLI,
its Dask nanny and worker) and of the Prefect server while it ran: on a machine whose cores all
compute, every CPU second outside the compute is taken from it.

``--variants``: extra rows that take the flow's gap apart: ``plain-with-server`` (the plain loop
while the idle Prefect server runs beside it), ``api-logs-off`` (the flow at 1 worker x N
threads with ``PREFECT_LOGGING_TO_API_ENABLED=false``).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-c", "from flows.cli import app; app()"]


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children and their reaped
    descendants."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def server_cpu() -> float:
    """CPU seconds so far of the running Prefect server started by this process (0: none)."""
    import psutil

    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            if "server" in p.cmdline():
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            continue
    return total


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float | None, float, float]:
    """(wall seconds of the command, seconds of its task phase as `shapcam run` prints it,
    CPU seconds of its processes, CPU seconds of the Prefect server meanwhile)."""
    cpu, server = children_cpu(), server_cpu()
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    found = re.search(r"^tasks: ([0-9.]+) s", out.stdout, re.MULTILINE)
    return (wall, float(found.group(1)) if found else None, children_cpu() - cpu,
            server_cpu() - server)


_LAYER = r"""
import json, sys, time, torch
from shapcam.runtime.cpu import tune_allocator
from tasks.config import RunConfig
from tasks.pipeline import plan_run, process_shard
tune_allocator()
root, run_dir, mode, threads, batch = sys.argv[1:6]
config = RunConfig.build(dataset="imagenet", root=root, methods="gradcam,shapcam", causal=False,
                         shard_size=64, threads=int(threads), batch_images=int(batch))
plan = plan_run(run_dir, "layer", config)
def shards():
    for k, records in enumerate(plan["shards"]):
        process_shard(run_dir, config, config.models[0], k, records)
if mode == "inprocess":
    t = time.perf_counter(); shards(); print(json.dumps(time.perf_counter() - t))
else:
    from distributed import Client
    from flows.runtime import local_cluster
    if __name__ == "__main__":
        with local_cluster(n_workers=1, threads=int(threads)) as cluster, Client(cluster) as c:
            c.wait_for_workers(1)
            t = time.perf_counter()
            futures = [c.submit(process_shard, run_dir, config, config.models[0], k, r,
                                pure=False) for k, r in enumerate(plan["shards"])]
            c.gather(futures)
            print(json.dumps(time.perf_counter() - t))
"""


def layer(root: Path, run_dir: Path, mode: str, threads: int, batch: int,
          env: dict[str, str]) -> float:
    """Seconds of the pipeline's shard loop without Prefect: in this process's layer
    (``inprocess``) or submitted to one local Dask worker (``dask``), model load included."""
    script = run_dir.parent / f"layer-{mode}.py"
    script.write_text(_LAYER)
    out = subprocess.run([sys.executable, str(script), str(root), str(run_dir), mode,
                          str(threads), str(batch)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (all cores)")
    parser.add_argument("--batches", default="8,16", help="plain-loop batch sizes to try")
    parser.add_argument("--shards", default="8,64,256", help="shard sizes, side by side")
    parser.add_argument("--layers", default="inprocess,dask",
                        help="pipeline layers without Prefect to time (empty: none)")
    parser.add_argument("--variants", default="",
                        help="extra rows: plain-with-server, api-logs-off (comma-separated)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    from shapcam.data.sample_dataset import build_synthetic_dataset

    tmp = Path(tempfile.mkdtemp(prefix="shapcam-orch-"))
    t = time.perf_counter()
    root = build_synthetic_dataset(tmp / "data", args.images, seed=0)
    print(f"dataset: {args.images} images in {time.perf_counter() - t:.1f} s at {root}",
          flush=True)
    threads = str(args.threads)
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "OMP_NUM_THREADS": threads,
           "DASK_LOGGING__DISTRIBUTED": "error"}
    common = ["--dataset", "imagenet", "--root", str(root), "--methods", "gradcam,shapcam",
              "--no-causal"]
    variants = set(filter(None, args.variants.split(",")))
    unknown = variants - {"plain-with-server", "api-logs-off"}
    if unknown:
        raise SystemExit(f"unknown --variants {sorted(unknown)}")
    def plain_loop(batch: int) -> list[str]:
        return [*CLI, "evaluate", *common, "--batch-images", str(batch), "--device", "cpu"]

    plain = {}
    for b in (int(v) for v in args.batches.split(",")):
        plain[b] = timed(plain_loop(b), env)
        print(f"shapcam evaluate --batch-images {b}: {plain[b][0]:.1f} s", flush=True)
    best = min(plain, key=lambda b: plain[b][0])
    t_plain = plain[best][0]
    layers = {}
    for mode in filter(None, args.layers.split(",")):
        layers[mode] = layer(root, tmp / f"layer-{mode}", mode, args.threads, best, env)
        print(f"pipeline, {mode}: {layers[mode]:.1f} s", flush=True)
    (tmp / "prefect").mkdir()
    os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]
    from flows.runtime import local_prefect_server, prefect_environment

    prefect_environment(tmp / "prefect")
    runs: list[tuple[str, int, int, int, dict[str, str]]] = [
        (f"1 worker x {threads} threads, shards of 64", 1, args.threads, 64, {}),
        ("1 worker x 1 thread, shards of 64", 1, 1, 64, {}),
        (f"{args.threads} workers x 1 thread, shards of 64", args.threads, 1, 64, {})]
    if "api-logs-off" in variants:
        runs.append((f"1 worker x {threads} threads, shards of 64, "
                     "PREFECT_LOGGING_TO_API_ENABLED=false", 1, args.threads, 64,
                     {"PREFECT_LOGGING_TO_API_ENABLED": "false"}))
    runs += [(f"1 worker x {threads} threads, shards of {s}", 1, args.threads, int(s), {})
             for s in args.shards.split(",") if int(s) != 64]
    t = time.perf_counter()
    timings = {}
    with local_prefect_server() as url:
        t_server = time.perf_counter() - t
        if "plain-with-server" in variants:
            label = f"shapcam evaluate --batch-images {best}, the idle Prefect server beside it"
            timings[label] = timed(plain_loop(best), env)
            print(f"{label}: {timings[label][0]:.1f} s", flush=True)
        env["PREFECT_API_URL"] = f"{url}/api"
        for label, workers, n_threads, shard, extra in runs:
            timings[f"shapcam run, {label}"] = timed(
                [*CLI, "run", *common, "--store", str(tmp / "runs"), "--run-id",
                 re.sub(r"\W+", "-", label), "--shard-size", str(shard), "--batch-images",
                 str(best), "--workers", str(workers), "--threads", str(n_threads)],
                {**env, "OMP_NUM_THREADS": str(n_threads), **extra})
            print(f"shapcam run, {label}: {timings[f'shapcam run, {label}'][0]:.1f} s",
                  flush=True)
    rows = [f"{args.images} images, Grad-CAM + Shap-CAM, no deletion/insertion, "
            f"{os.cpu_count()} cores",
            "", "| command | end to end s | ratio to the plain loop | task phase s | "
            "CPU s of its processes | CPU s of the Prefect server |",
            "|---|---|---|---|---|---|"]
    rows += [f"| shapcam evaluate --batch-images {b} (plain loop, {threads} threads) | "
             f"{s[0]:.1f} | {s[0] / t_plain:.2f}x{' (best)' if b == best else ''} | | "
             f"{s[2]:.1f} | |" for b, s in plain.items()]
    for label, (secs, task_secs, cpu, server) in timings.items():
        phase = "" if task_secs is None else f"{task_secs:.1f}"
        rows.append(f"| {label} | {secs:.1f} | **{secs / t_plain:.2f}x** | {phase} | "
                    f"{cpu:.1f} | {server:.1f} |")
    labels = {"inprocess": "in one process", "dask": "on one local Dask worker"}
    rows += [f"| pipeline without Prefect, {labels[mode]} (shards of 64; work only) | | | "
             f"{secs:.1f} | | |" for mode, secs in layers.items()]
    one = timings["shapcam run, 1 worker x 1 thread, shards of 64"]
    two = timings[f"shapcam run, {args.threads} workers x 1 thread, shards of 64"]
    rows.append(f"| {args.threads} workers vs 1 worker, 1 thread each (throughput) | | "
                f"**{one[0] / two[0]:.2f}x** end to end | {one[1] / two[1]:.2f}x | | |")
    rows.append(f"| Prefect server start (excluded above) | {t_server:.1f} | | | | |")
    print("\n".join(rows))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
