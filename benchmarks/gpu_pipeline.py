"""The GPU checks of dataset runs, as one script for a lent GPU machine (about 10 minutes).

    .venv/bin/python benchmarks/gpu_pipeline.py [--images 512] [--out gpu-pipeline.md]

1. `shapcam run --device cuda` end to end (local one-worker-per-GPU cluster, its own Prefect
   server) on a synthetic ILSVRC-layout set made from the sample photos: Grad-CAM + Shap-CAM +
   Average Drop (no deletion/insertion), MobileNetV2 (real weights) and VGG16 (random weights:
   speed does not depend on them), shards of 64; images/s of the task phase, with two shard
   tasks per GPU (the default) and, for MobileNetV2, one (what the overlap gains).
2. The compute floor of the same passes on the same card: plain batched calls on pre-decoded
   tensors (trunk forward, Grad-CAM backward, the Shap-CAM head work, the two Average Drop
   forwards), 64 images per batch; the run's throughput as a fraction of it (goal >= 70%).
3. `--dry-run`'s projection against a real run of the quick preset (all six methods) on
   MobileNetV2 for 128 images.
4. The Shap-CAM engine against its floor on GAP+FC heads on the GPU
   (`bench_shapcam_floor.py --device cuda`), and the fp16 tolerance test
   (`tests/test_precision.py`).

Prints markdown to paste into docs/benchmarks.md (with the card's name).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_cost import REPO, cost_check, shapcam


def task_seconds(stdout: str) -> float:
    return float(re.search(r"^tasks: ([0-9.]+) s", stdout, re.MULTILINE).group(1))


def floor_images_per_second(model: str, weights: str, x: torch.Tensor) -> float:
    """Grad-CAM + Shap-CAM + Average Drop as plain batched calls on pre-decoded tensors."""
    from shapcam import build_method, load_model
    from shapcam.evaluation.metrics import confidence_metrics

    lm = load_model(model, weights, device="cuda")
    gradcam, shap = build_method("gradcam", lm), build_method("shapcam", lm)

    def once() -> None:
        for s in range(0, x.shape[0], 64):
            xb = x[s:s + 64]
            for cam in (gradcam, shap):
                r = cam(xb)
                confidence_metrics(lm.model, xb, r.maps.half().float(), r.targets)

    once()
    torch.cuda.synchronize()
    t = time.perf_counter()
    once()
    torch.cuda.synchronize()
    return x.shape[0] / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from shapcam.data import open_dataset
    from shapcam.data.sample_dataset import build_synthetic_dataset
    from shapcam.data.stream import decoded_batches
    from shapcam.zoo.weights import install_offline_weights

    install_offline_weights()
    card = torch.cuda.get_device_name(0)
    tmp = Path(tempfile.mkdtemp(prefix="shapcam-gpu-"))
    root = build_synthetic_dataset(tmp / "data", args.images)
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PYTHONPATH": str(REPO)}
    lines = [f"GPU: {card}, torch {torch.__version__}, {args.images} images", "",
             "| model | shapcam run images/s (task phase) | floor images/s | run / floor |",
             "|---|---|---|---|"]
    records = open_dataset("imagenet", root)
    x = torch.cat([torch.stack([d.x for d in b]) for b in decoded_batches(records, 64, 8)])
    x = x.cuda()
    floors: dict[str, float] = {}
    for model, weights, tasks in (("mobilenet_v2", "IMAGENET1K_V1", 2),
                                  ("mobilenet_v2", "IMAGENET1K_V1", 1),
                                  ("vgg16", "random", 2)):
        out = shapcam("run", "--dataset", "imagenet", "--root", str(root), "--models",
                      f"{model}:{weights}", "--methods", "gradcam,shapcam", "--no-causal",
                      "--shard-size", "64", "--device", "cuda", "--tasks-per-gpu", str(tasks),
                      "--store", str(tmp / "runs"), "--run-id", f"{model}-{tasks}", env=env)
        run_ips = args.images / task_seconds(out)
        if model not in floors:
            floors[model] = floor_images_per_second(model, weights, x)
        lines.append(f"| {model}, --tasks-per-gpu {tasks} | {run_ips:.1f} | "
                     f"{floors[model]:.1f} | **{run_ips / floors[model]:.0%}** |")
    # the cost model against a real run (quick preset, six methods, MobileNetV2)
    lines += ["", *cost_check(root, 128, "cuda", tmp / "runs", env), ""]
    floor = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_shapcam_floor.py"),
                            "--device", "cuda"], cwd=REPO, capture_output=True, text=True)
    lines.append(floor.stdout)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_precision.py"],
                           cwd=REPO, capture_output=True, text=True)
    lines.append("tests/test_precision.py: " + tests.stdout.strip().splitlines()[-1])
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
