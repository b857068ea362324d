"""What each field metric costs per image and method, next to one forward of the model.

    .venv/bin/python benchmarks/bench_field_metrics.py [--model mobilenet_v2] [--images 6]
        [--device cuda] [--methods gradcam,shapcam]

Maps come from each method on the bundled photos (224 x 224); every metric family of
``--metrics`` is timed on the same batch (best of two after a warm-up for the cheap ones, one
timed call for ROAD and MPRT), and printed in seconds per image and as a multiple of one forward
of one image (the forward measured in the same batch). MPRT includes its three explanations by
the method, so it scales with the method's own cost.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_baselines import clock  # noqa: E402 - one timed call
from bench_shapcam import timed  # noqa: E402 - the benchmarks' shared timer

from shapcam import build_method, load_model  # noqa: E402
from shapcam.data.images import load_batch  # noqa: E402
from shapcam.data.photos import bundled_photo_paths  # noqa: E402
from shapcam.evaluation.evaluate import (  # noqa: E402
    randomised_maps,
    randomised_methods,
    randomised_models,
    stored_precision,
)
from shapcam.evaluation.field_metrics import FIELD_METRICS, field_scores  # noqa: E402


def metric_seconds(lm, name: str, metric: str, x, maps, targets, boxes) -> float:
    """Seconds of one metric family on the batch (MPRT with its randomised explanations)."""
    if metric == "mprt":
        def run():
            cams = randomised_methods(randomised_models(lm), name, {})
            field_scores(maps, boxes, ["mprt"], randomised=randomised_maps(cams, x, targets, {}))
        return clock(run)

    def run():
        field_scores(maps, boxes, [metric], model=lm.model, x=x, targets=targets)
    return clock(run) if metric == "road" else timed(run, repeat=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", default="IMAGENET1K_V1")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--methods", default="gradcam,shapcam")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    lm = load_model(args.model, args.weights, device=args.device)
    paths = bundled_photo_paths()[: args.images]
    x, _ = load_batch(paths)
    x = x.to(args.device)
    B = x.shape[0]
    boxes = [torch.tensor([[40.0, 40, 180, 180]])] * B  # one box per image (cost only)
    with torch.no_grad():
        forward = timed(lambda: lm.model(x), repeat=2) / B
    print(f"{args.model} on {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), {B} images; one forward: "
          f"{forward * 1e3:.1f} ms per image")
    print("| method | metric | s per image | x one forward |")
    print("|---|---|---|---|")
    for name in args.methods.split(","):
        cam = build_method(name, lm, {})
        result = cam(x)
        maps, targets = stored_precision(result.maps), result.targets
        for metric in FIELD_METRICS:
            seconds = metric_seconds(lm, name, metric, x, maps, targets, boxes) / B
            print(f"| {name} | {metric} | {seconds:.4f} | {seconds / forward:.1f} |")


if __name__ == "__main__":
    main()
