"""The Shap-CAM engine against its own floor on GAP + FC heads, same K, players and images.

    .venv/bin/python benchmarks/bench_shapcam_floor.py [--device cuda] [--repeat 5]

On a head ``logits = W mean(A) + b`` every coalition's logits are a prefix sum of per-position
contributions ``W A_p / n`` along an order. The floor is that computation as one batched op and
nothing else: build the ``(n, classes)`` table, gather it in ``K`` random orders, cumsum along the
order (``K * n x classes`` logits per image), softmax, take the target, difference, scatter back
to the players. The engine is ``ShapCAM.estimate`` (fast path, the same K, value = probability),
trunk excluded for both. Goal: within 1.5x of the floor.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shapcam import timed  # noqa: E402 - the benchmarks' shared timer

from shapcam import ShapCAM, load_model  # noqa: E402
from shapcam.data.images import load_batch  # noqa: E402
from shapcam.data.photos import bundled_photo_paths  # noqa: E402
from shapcam.zoo.split import split_model  # noqa: E402


def floor(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
          targets: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
    """phi ``(B, n)`` of the GAP + FC game by permutation sampling, as one batched op."""
    B, C, h, w = features.shape
    n = h * w
    table = torch.einsum("bcn,kc->bnk", features.flatten(2), weight) / n  # (B, n, classes)
    orders = torch.argsort(torch.rand(B, K, n, generator=generator, device=features.device),
                           -1)
    steps = torch.gather(table.unsqueeze(1).expand(B, K, n, -1), 2,
                         orders.unsqueeze(-1).expand(B, K, n, table.shape[-1]))
    logits = torch.cat([torch.zeros_like(steps[:, :, :1]), steps], 2).cumsum(2) + bias
    value = logits.softmax(-1).gather(-1, targets.view(B, 1, 1, 1).expand(B, K, n + 1, 1))
    marginal = value.squeeze(-1).diff(dim=2)  # (B, K, n) in order position
    phi = torch.zeros(B, K, n, device=features.device).scatter_(2, orders, marginal)
    return phi.mean(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("-K", type=int, default=512)
    args = parser.parse_args()
    device = torch.device(args.device)
    paths = bundled_photo_paths()[:args.images]
    x, _ = load_batch(paths)
    x = x.to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device: {device} ({name or 'CPU'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {x.shape[0]} images, K = {args.K}\n")
    print("| head | players | engine s/img | floor s/img | engine / floor | max phi gap to "
          "floor at K=4096 / max phi |")
    print("|---|---|---|---|---|---|")
    for model, weights, fc in (("mobilenet_v2", "IMAGENET1K_V1", "classifier.1"),
                               ("resnet18", "random", "fc")):
        print(row(model, weights, fc, x, args.K, args.repeat, device))


def row(model: str, weights: str, fc: str, x: torch.Tensor, K: int, repeat: int,
        device: torch.device) -> str:
    lm = load_model(model, weights, device=str(device))
    trunk, head = split_model(lm.model, lm.target_layer)
    with torch.no_grad():
        features = trunk(x)
        targets = head(features).argmax(1)
    linear = lm.model.get_submodule(fc)
    cam = ShapCAM(lm, permutations=K)
    game = cam.game(features, targets)
    assert game.plan is not None, "the fast path must apply"
    seeds = list(range(x.shape[0]))
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        t_engine = timed(lambda: cam.estimate(game, seeds), repeat)
        t_floor = timed(lambda: floor(features, linear.weight, linear.bias, targets, K, gen),
                        repeat)
        # the floor is the same estimator: its phi agrees with the engine's within sampling
        est = cam.estimate(game, seeds).phi.float()
        ref = floor(features, linear.weight, linear.bias, targets, 4096, gen)
    err = float((est - ref).abs().max() / ref.abs().max())
    B = x.shape[0]
    return (f"| {model} ({lm.target_layer}) | {features.shape[2] * features.shape[3]} | "
            f"{t_engine / B:.4f} | {t_floor / B:.4f} | **{t_engine / t_floor:.2f}x** | "
            f"{err:.3f} |")

if __name__ == "__main__":
    main()
