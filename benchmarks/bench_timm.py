"""Shap-CAM on timm models (ViT-S/16 and Swin-T tokens, ConvNeXt-T positions) against
captum's ShapleyValueSampling on the same game, side by side.

    .venv/bin/python benchmarks/bench_timm.py [--device cuda] [--permutations 8,32] [--images 2]

Random weights (speed does not depend on them), 224 x 224 inputs. The game is the one Shap-CAM
plays: for the ViT the patch tokens entering the last block, absent tokens removed from
attention (``TokenHead(tokens, present)``); for Swin-T the 7 x 7 tokens entering its last block
(``SwinHead``, generic path: the last block per coalition); for ConvNeXt-T the positions of
``stages``, masked to zero before its generic head (pool -> LayerNorm -> Linear). captum gets
the same value function: a ``(1, n)`` input of ones whose entries it sets to the baseline 0,
turned into the coalition and handed to the same head; its ``n_samples`` is our ``K``. Both
cost linearly in ``K``: the table reports measured seconds at two ``K`` and the projection to
the default ``K = 512`` (linear through the two), with and without ``block=2`` for the ViT. On
the ViT, ours is the exact class-token path (``shapcam.zoo.tokens.ClassTokenPath``) and captum is
handed the same value function; the generic path (the last block on the whole sequence per
coalition, ``fast_path="off"``) is timed at ``K = 1`` and multiplied by 512.
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
from shapcam.methods.shapcam import DEFAULT_PERMUTATIONS  # noqa: E402


def ours(cam: ShapCAM, tokens: torch.Tensor, targets: torch.Tensor) -> None:
    game = cam.game(tokens, targets)
    cam.estimate(game, [0] * tokens.shape[0])


def captum(cam: ShapCAM, tokens: torch.Tensor, targets: torch.Tensor, K: int) -> None:
    from captum.attr import ShapleyValueSampling

    for b in range(tokens.shape[0]):  # captum shares one order per batch: one image a call
        game = cam.game(tokens[b:b + 1], targets[b:b + 1])
        n = game.n_players

        def forward(present: torch.Tensor, game=game) -> torch.Tensor:
            index = torch.zeros(present.shape[0], dtype=torch.long, device=present.device)
            return game(index, present > 0.5)

        ShapleyValueSampling(forward).attribute(
            torch.ones(1, n, device=tokens.device), baselines=0.0, n_samples=K,
            perturbations_per_eval=min(256, n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--permutations", default="8,32")
    ap.add_argument("--images", type=int, default=2)
    args = ap.parse_args()
    ks = [int(k) for k in args.permutations.split(",")]
    x = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    x = x.to(args.device)
    print(f"{args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), {args.images} images, random weights")
    print("| model | players | K | ours s/img | captum s/img | captum / ours | "
          f"ours projected to K={DEFAULT_PERMUTATIONS} (s/img) |")
    print("|---|---|---|---|---|---|---|")
    cases = (("timm:vit_small_patch16_224", None, None), ("timm:vit_small_patch16_224", 2, None),
             ("timm:swin_tiny_patch4_window7_224", None, None),
             ("timm:convnext_tiny", None, None), ("timm:convnext_tiny", None, 1024))
    for name, block, batch in cases:  # batch: coalitions per head call (None: the default)
        lm = load_model(name, "random", device=args.device)
        cam = ShapCAM(lm, block=block, batch_size=batch)
        label = f"{name}{' block=2' if block else ''} batch {batch or 'default'}"
        with torch.no_grad():
            tokens = cam.trunk(x)
            targets = cam.head(tokens).argmax(1)
        per_k = []
        for K in ks:
            cam.permutations = K
            t_ours = timed(lambda a=(cam, tokens, targets): ours(*a), 3) / args.images
            t_captum = timed(lambda a=(cam, tokens, targets, K): captum(*a), 3) / args.images
            per_k.append((K, t_ours))
            players = cam.game(tokens[:1], targets[:1]).n_players
            print(f"| {label} | {players} | {K} | {t_ours:.3f} | "
                  f"{t_captum:.3f} | {t_captum / t_ours:.2f}x | |")
        if name.startswith("timm:vit"):  # every block on the sequence: the path before
            slow = ShapCAM(lm, block=block, batch_size=batch or 256, fast_path="off",
                           permutations=1)
            t_slow = timed(lambda a=(slow, tokens, targets): ours(*a)) / args.images
            print(f"| {label}, generic path (fast_path=off) | | 1 | "
                  f"{t_slow:.2f} | | | {t_slow * DEFAULT_PERMUTATIONS:.0f} |")
        (k0, t0), (k1, t1) = per_k[0], per_k[-1]
        slope = (t1 - t0) / (k1 - k0) if k1 != k0 else t1 / k1
        projected = t0 + slope * (DEFAULT_PERMUTATIONS - k0)
        print(f"| {label} | | {DEFAULT_PERMUTATIONS} | | | | "
              f"{projected:.1f} |")


if __name__ == "__main__":
    main()
