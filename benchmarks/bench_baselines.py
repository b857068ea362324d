"""Baselines and metrics: cost against their floors and pytorch-grad-cam, side by side.

    .venv/bin/python benchmarks/bench_baselines.py [--device cuda] [--rise-masks 1000]

MobileNetV2 (real weights) on one sample photo:
- Score-CAM (ours) vs its floor, the C + 1 forward passes alone in the same batches, and vs
  pytorch-grad-cam's ScoreCAM (same batch size, same model and layer);
- RISE (ours) vs its floor, N forward passes of already-built masked images;
- metrics for a batch of 32 images (Average Drop / Increase, energy pointing game) vs one
  Score-CAM map; deletion/insertion (2 x 225 forwards per image) reported separately.
"""

from __future__ import annotations

import argparse
import time

import torch

from shapcam import RISE, ScoreCAM, load_model
from shapcam.data.images import load_batch
from shapcam.data.photos import bundled_photo
from shapcam.evaluation.metrics import confidence_metrics, deletion_insertion, energy_pointing_game
from shapcam.zoo.weights import install_offline_weights


def clock(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def forwards(model, n: int, batch: int, device: str) -> float:
    """Seconds for ``n`` forward passes of 224 x 224 images in batches of ``batch``."""
    x = torch.randn(batch, 3, 224, 224, device=device)

    def run() -> None:
        with torch.no_grad():
            for s in range(0, n, batch):
                model(x[: min(batch, n - s)])

    return clock(run)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rise-masks", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    install_offline_weights()
    lm = load_model("mobilenet_v2", "IMAGENET1K_V1", device=args.device)
    x, _ = load_batch([bundled_photo("coffee").path])
    x = x.to(args.device)
    B = args.batch
    print(f"# device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = ["| what | seconds | floor / anchor | ratio |", "|---|---|---|---|"]

    score = ScoreCAM(lm, batch_size=B)
    score(x)  # warm-up
    t_score = clock(lambda: score(x))
    C = lm.model.features[18][0].out_channels
    t_floor = forwards(lm.model, C + 1, B, args.device)
    rows.append(f"| Score-CAM (ours, batch {B}) | {t_score:.2f} | floor {t_floor:.2f} "
                f"({C + 1} forwards) | **{t_score / t_floor:.2f}x** floor |")
    from pytorch_grad_cam import ScoreCAM as TheirScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    theirs = TheirScoreCAM(model=lm.model, target_layers=[lm.model.features[18]])
    theirs.batch_size = B
    target = [ClassifierOutputTarget(int(score(x).targets[0]))]
    t_theirs = clock(lambda: theirs(input_tensor=x, targets=target))
    rows.append(f"| pytorch-grad-cam ScoreCAM (batch {B}) | {t_theirs:.2f} | ours "
                f"{t_score:.2f} | **{t_theirs / t_score:.2f}x** ours |")

    N = args.rise_masks
    rise = RISE(lm, n_masks=N, batch_size=B)
    rise(x)
    t_rise = clock(lambda: rise(x))
    t_rfloor = forwards(lm.model, N, B, args.device)
    rows.append(f"| RISE N={N} (ours, batch {B}) | {t_rise:.2f} | floor {t_rfloor:.2f} "
                f"({N} forwards) | **{t_rise / t_rfloor:.2f}x** floor |")

    x32 = x.expand(32, -1, -1, -1).contiguous()
    maps = torch.rand(32, 224, 224, device=args.device)
    targets = torch.full((32,), 967, device=args.device)
    boxes = [torch.tensor([[60.0, 10.0, 150.0, 170.0]])] * 32

    def cheap() -> None:
        confidence_metrics(lm.model, x32, maps, targets, "scorecam", batch_size=B)
        energy_pointing_game(maps, boxes)

    cheap()
    t_cheap = clock(cheap)
    rows.append(f"| AvgDrop/Increase + pointing game, 32 images | {t_cheap:.2f} | one Score-CAM "
                f"map {t_score:.2f} | **{t_cheap / t_score:.2f}x** |")
    t_causal = clock(lambda: deletion_insertion(lm.model, x32[:2], maps[:2], targets[:2],
                                                batch_size=B)) / 2
    rows.append(f"| deletion + insertion, per image (450 forwards) | {t_causal:.2f} | one "
                f"Score-CAM map {t_score:.2f} | {t_causal / t_score:.2f}x |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
