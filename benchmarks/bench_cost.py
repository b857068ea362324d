"""The cost model (`shapcam run --dry-run`) against a real run of the same command.

    .venv/bin/python benchmarks/bench_cost.py [--images 48] [--device cpu] [--threads 2]

A synthetic ILSVRC-layout set of ``--images`` images made from the sample photos, the quick
preset (all six methods, deletion/insertion included), MobileNetV2 with its real weights, one
worker: the projection ``--dry-run`` prints (its 20-second calibration), then the run itself.
Printed side by side: each method's projected map seconds per image against the seconds per
image the run's shards recorded, and the projected compute time of the run against its task
phase (which also holds the metrics, the writes and Prefect's task runs).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from flows.cli import app; app()"]


def shapcam(*args: str, env: dict[str, str]) -> str:
    out = subprocess.run([*CLI, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    return out.stdout


def projected_map_seconds(plan: str) -> dict[str, float]:
    """method -> projected map seconds per image, from the ``--dry-run`` table."""
    rows = re.findall(r"^\|\s*(\w+)\s*\|[^|]*\|\s*([0-9.]+)\s*\|", plan, re.MULTILINE)
    return {m: float(s) for m, s in rows if m not in ("method", "all")}


def cost_check(root: Path, n_images: int, device: str, store: Path, env: dict[str, str],
               extra: tuple[str, ...] = ()) -> list[str]:
    """Markdown lines: the projection of ``--dry-run`` against the real run."""
    from storage import open_run

    common = ["--dataset", "imagenet", "--root", str(root), "--n-images", str(n_images),
              "--preset", "quick", "--device", device, "--shard-size", "16", *extra]
    plan = shapcam("run", *common, "--dry-run", env=env)
    projected = float(re.search(r"; ([0-9.]+) s \(", plan).group(1))
    out = shapcam("run", *common, "--store", str(store), "--run-id", "cost", env=env)
    real = float(re.search(r"^tasks: ([0-9.]+) s", out, re.MULTILINE).group(1))
    metrics = open_run(store / "cost").metrics()
    measured = metrics.groupby("method")["seconds"].mean().to_dict()
    lines = ["| method | projected map s / image | measured map s / image | projected / measured |",
             "|---|---|---|---|"]
    for m, p in projected_map_seconds(plan).items():
        lines.append(f"| {m} | {p:.3f} | {measured[m]:.3f} | **{p / measured[m]:.2f}x** |")
    lines += ["", f"run: projected {projected:.0f} s of compute for {n_images} images (quick "
              f"preset, six methods, metrics included), measured task phase {real:.0f} s: "
              f"**{projected / real:.2f}x**"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from shapcam.data.sample_dataset import build_synthetic_dataset
    from shapcam.zoo.weights import install_offline_weights

    install_offline_weights()
    tmp = Path(tempfile.mkdtemp(prefix="shapcam-cost-"))
    root = build_synthetic_dataset(tmp / "data", args.images)
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": str(args.threads)}
    extra = ("--workers", "1", "--threads", str(args.threads)) if args.device == "cpu" else ()
    print("\n".join(cost_check(root, args.images, args.device, tmp / "runs", env, extra)))


if __name__ == "__main__":
    main()
