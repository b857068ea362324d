"""Shap-CAM speed and estimator quality, measured side by side with the anchors in one run.

    .venv/bin/python benchmarks/bench_shapcam.py [--quick] [--device cuda]

Prints markdown tables (paste them into docs/benchmarks.md):

1. Per-image time of the Shapley estimate on the same head, players (positions), K and value
   function (softmax probability of the predicted class): captum's ShapleyValueSampling at its
   best ``perturbations_per_eval``, our generic batched path (``fast_path="off"``: masks through
   the head, the method's own floor) and our exact fast path. The trunk is run once beforehand
   and excluded for everyone.
2. ShapCAM (K=32) on VGG16 against pytorch-grad-cam's ScoreCAM on the same image, full method
   (trunk included for both). Skipped with ``--quick``.
3. Mean squared error against a K=16384 reference of plain vs antithetic sampling at an equal
   number of head evaluations, on the real MobileNetV2 and the bundled photos.
4. Largest standard error relative to the largest |phi| per photo for several K (the criterion
   behind the default K).

VGG16 and ResNet18 use random weights (no offline ImageNet weights exist here); speed does not
depend on the weight values. MobileNetV2 uses the real ImageNet checkpoint.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch

from shapcam import ShapCAM, load_model
from shapcam.data.images import load_batch
from shapcam.data.photos import bundled_photo_paths
from shapcam.zoo.weights import install_offline_weights


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """Best wall time of ``repeat`` runs after one warm-up run (seconds)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def captum_time(head: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor, K: int,
                ppe_choices: list[int], repeat: int) -> tuple[float, int]:
    """Per-image seconds of captum's ShapleyValueSampling at its best perturbations_per_eval."""
    from captum.attr import ShapleyValueSampling

    h, w = features.shape[-2:]
    mask = torch.arange(h * w, device=features.device).view(1, 1, h, w)

    def forward(a: torch.Tensor) -> torch.Tensor:
        return head(a).softmax(1)

    svs = ShapleyValueSampling(forward)
    results = []
    for ppe in ppe_choices:
        def run(ppe: int = ppe) -> None:
            with torch.no_grad():
                for b in range(features.shape[0]):  # captum shares one order per batch
                    svs.attribute(features[b:b + 1], baselines=0.0, target=int(targets[b]),
                                  n_samples=K, perturbations_per_eval=ppe, feature_mask=mask)

        results.append((timed(run, repeat) / features.shape[0], ppe))
    return min(results)


def speed_table(device: str, quick: bool, repeat: int) -> list[str]:
    photos, _ = load_batch(bundled_photo_paths())
    rows = ["| head | players | K | captum best (s/img) | ours generic (s/img) | "
            "ours fast path (s/img) | captum / ours | generic / fast |",
            "|---|---|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    cases = [("mobilenet_v2", "IMAGENET1K_V1", photos[:4], [49, 196]),
             ("resnet18", "random", torch.randn(4, 3, 224, 224), [49, 196]),
             ("vgg16", "random", torch.randn(1, 3, 224, 224), [196])]
    K = 32
    for name, weights, x, ppe in cases:
        lm = load_model(name, weights, device=device)
        fast = ShapCAM(lm, permutations=K)
        slow = ShapCAM(lm, permutations=K, fast_path="off", batch_size=256)
        x = x.to(device)
        with torch.no_grad():
            features = fast.trunk(x)
            logits = fast.head(features)
        targets = logits.argmax(1)
        B = x.shape[0]

        def ours(cam: ShapCAM, features=features, logits=logits, targets=targets, x=x) -> None:
            cam.raw_maps(x, targets, features=features, logits=logits)

        # Same number of timed runs for every contender (best of them: the VM is noisy).
        reps = 1 if name == "vgg16" else repeat
        t_fast = timed(lambda cam=fast: ours(cam), reps) / B
        t_slow = timed(lambda cam=slow: ours(cam), reps) / B
        t_captum, best_ppe = captum_time(fast.head, features, targets, K, ppe, reps)
        n = features.shape[-1] * features.shape[-2]
        rows.append(f"| {name} ({fast.target_layer}) | {n} | {K} | {t_captum:.3f} "
                    f"(ppe={best_ppe}) | {t_slow:.3f} | {t_fast:.4f} | "
                    f"**{t_captum / t_fast:.1f}x** | {t_slow / t_fast:.1f}x |")
        print(rows[-1], flush=True)
    if quick:
        return rows
    # ShapCAM K=32 vs pytorch-grad-cam ScoreCAM on VGG16, whole method on one image.
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    lm = load_model("vgg16", "random", device=device)
    x = torch.randn(1, 3, 224, 224, device=device)
    shap = ShapCAM(lm, permutations=K)
    t_shap = timed(lambda: shap(x))
    target = int(shap(x).targets[0])
    score = ScoreCAM(model=lm.model, target_layers=[lm.model.features[29]])
    score.batch_size = 32
    t0 = time.perf_counter()
    score(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    t_score = time.perf_counter() - t0
    rows += ["", "| VGG16, one image | seconds |", "|---|---|",
             f"| ShapCAM K={K} (fast path, whole method) | {t_shap:.2f} |",
             f"| pytorch-grad-cam ScoreCAM (batch 32) | {t_score:.2f} |",
             f"| ScoreCAM / ShapCAM | **{t_score / t_shap:.1f}x** |"]
    print("\n".join(rows[-6:]), flush=True)
    return rows


def quality_tables(device: str, quick: bool) -> list[str]:
    install_offline_weights()
    lm = load_model("mobilenet_v2", "IMAGENET1K_V1", device=device)
    x, _ = load_batch(bundled_photo_paths())
    x = x.to(device)
    names = [p.stem for p in bundled_photo_paths()]
    ref = ShapCAM(lm, permutations=16384, seed=12345)(x).raw
    seeds = range(8 if quick else 20)
    rows = ["| photo | MSE plain K=64 | MSE antithetic K=64 (32 pairs) | antithetic / plain |",
            "|---|---|---|---|"]
    mse = {}
    for anti in (False, True):
        errs = [((ShapCAM(lm, permutations=64, antithetic=anti, seed=s)(x).raw - ref) ** 2)
                .mean((1, 2)) for s in seeds]
        mse[anti] = torch.stack(errs).mean(0)
    for i, name in enumerate(names):
        rows.append(f"| {name} | {mse[False][i]:.3g} | {mse[True][i]:.3g} | "
                    f"{mse[True][i] / mse[False][i]:.2f} |")
    rows.append(f"| **mean** | {mse[False].mean():.3g} | {mse[True].mean():.3g} | "
                f"**{mse[True].mean() / mse[False].mean():.2f}** |")
    print("\n".join(rows), flush=True)
    rows += ["", "| K (plain) | " + " | ".join(names) + " | worst |",
             "|---|" + "---|" * (len(names) + 1)]
    for K in (128, 256, 512):
        r = ShapCAM(lm, permutations=K)(x)
        ratio = r.extras["stderr"].flatten(1).amax(1) / r.raw.abs().flatten(1).amax(1)
        rows.append(f"| {K} | " + " | ".join(f"{v:.3f}" for v in ratio.tolist())
                    + f" | **{ratio.max():.3f}** |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip ScoreCAM, fewer seeds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per contender")
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    rows = speed_table(args.device, args.quick, args.repeat)
    rows += [""] + quality_tables(args.device, args.quick)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
