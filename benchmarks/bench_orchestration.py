"""Orchestration overhead and scaling of `shapcam run` against the plain loop `shapcam evaluate`.

    .venv/bin/python benchmarks/bench_orchestration.py [--images 64]

A dataset of ``--images`` images in the ILSVRC (Kaggle) layout is made from the six sample photos
(copied under new ids). Methods: gradcam and shapcam (default K); metrics without
deletion/insertion. Both commands run as a user would run them (one process each, model loading
included). The flow runs against one Prefect server started beforehand (its start-up is timed
and reported separately); its time includes starting and stopping its local Dask cluster.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-c", "from flows.cli import app; app()"]


def make_dataset(root: Path, n: int) -> Path:
    from shapcam.data.sample_dataset import SAMPLE_IMAGES, build_sample_dataset

    src = build_sample_dataset(root / "src")
    dst = root / "bench"
    data, ann = dst / "ILSVRC/Data/CLS-LOC/val", dst / "ILSVRC/Annotations/CLS-LOC/val"
    data.mkdir(parents=True)
    ann.mkdir(parents=True)
    shutil.copy(src / "LOC_synset_mapping.txt", dst)
    ids = list(SAMPLE_IMAGES)
    for i in range(n):
        base = ids[i % len(ids)]
        shutil.copy(src / f"ILSVRC/Data/CLS-LOC/val/{base}.JPEG", data / f"{base}_{i:03d}.JPEG")
        shutil.copy(src / f"ILSVRC/Annotations/CLS-LOC/val/{base}.xml",
                    ann / f"{base}_{i:03d}.xml")
    return dst


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float | None]:
    """(wall seconds of the command, seconds of its task phase as `shapcam run` prints it)."""
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    found = re.search(r"^tasks: ([0-9.]+) s", out.stdout, re.MULTILINE)
    return time.perf_counter() - t, float(found.group(1)) if found else None


def plain_compute(root: Path, threads: int, batch: int) -> float:
    """The plain loop's own work (model loaded, images read and explained and scored), timed
    in-process: what the flow's task phase is compared with."""
    import torch

    from shapcam.cpu import tune_allocator
    from shapcam.data import open_dataset
    from shapcam.evaluate import evaluate_records
    from shapcam.models import load_model

    tune_allocator()
    torch.set_num_threads(threads)
    lm = load_model("mobilenet_v2", "IMAGENET1K_V1")
    records = open_dataset("imagenet", root)
    t = time.perf_counter()
    evaluate_records(lm, records, ["gradcam", "shapcam"], batch_images=batch, causal=False)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=8)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shapcam-orch-"))
    root = make_dataset(tmp, args.images)
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "OMP_NUM_THREADS": "2",
           "DASK_LOGGING__DISTRIBUTED": "error"}
    common = ["--dataset", "imagenet", "--root", str(root), "--methods", "gradcam,shapcam",
              "--no-causal"]
    t_plain, _ = timed([*CLI, "evaluate", *common, "--batch-images", str(args.shard_size),
                        "--device", "cpu"], env)
    c_plain = {threads: plain_compute(root, threads, args.shard_size) for threads in (2, 1)}
    os.environ.update({"PREFECT_HOME": env["PREFECT_HOME"]})
    (tmp / "prefect").mkdir()
    from flows.runtime import local_prefect_server, prefect_environment

    prefect_environment(tmp / "prefect")
    t = time.perf_counter()
    timings = {}
    with local_prefect_server() as url:
        t_server = time.perf_counter() - t
        env["PREFECT_API_URL"] = f"{url}/api"
        for label, workers, threads in (("1 worker x 2 threads", 1, 2),
                                        ("1 worker x 1 thread", 1, 1),
                                        ("2 workers x 1 thread", 2, 1)):
            timings[label] = timed([*CLI, "run", *common, "--store", str(tmp / "runs"),
                                    "--run-id", label.replace(" ", "-"), "--shard-size",
                                    str(args.shard_size), "--workers", str(workers),
                                    "--threads", str(threads)], env)
    rows = ["| command | end to end s | ratio | work s (plain) / task phase s (flow) | ratio |",
            "|---|---|---|---|---|",
            f"| shapcam evaluate (plain loop, 2 threads) | {t_plain:.1f} | 1.00 | "
            f"{c_plain[2]:.1f} | 1.00 |",
            f"| plain loop, 1 thread (in-process) | | | {c_plain[1]:.1f} | "
            f"{c_plain[1] / c_plain[2]:.2f}x |"]
    for label, (secs, task_secs) in timings.items():
        rows.append(f"| shapcam run, {label} | {secs:.1f} | {secs / t_plain:.2f}x | "
                    f"{task_secs:.1f} | {task_secs / c_plain[2]:.2f}x |")
    one, two = timings["1 worker x 1 thread"], timings["2 workers x 1 thread"]
    rows.append(f"| 2 workers vs 1 worker, 1 thread each | | {one[0] / two[0]:.2f}x | | "
                f"**{one[1] / two[1]:.2f}x** throughput |")
    rows.append(f"| Prefect server start (excluded above) | {t_server:.1f} | | | |")
    print("\n".join(rows))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
