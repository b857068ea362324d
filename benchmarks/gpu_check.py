"""GPU check: ShapCAM runs unchanged on CUDA, agrees with the CPU, and how fast it is there.

    PYTHONPATH=. python benchmarks/gpu_check.py [--device cuda]

1. MobileNetV2 (real weights when the checkpoint is in the torch hub cache, else random) on the
   bundled photos: CUDA result (amp on and off) vs CPU result with the same seeds.
2. VGG16 (random weights): fast path vs generic path on the device, and efficiency.
3. Timings per image on the device (fast path, amp auto) for MobileNetV2 K=512 and VGG16 K=32
   and K=512, and VGG16's generic path at K=32 for the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from shapcam import ShapCAM, load_model
from shapcam.data.images import load_batch
from shapcam.data.photos import bundled_photo_paths
from shapcam.zoo.weights import hub_checkpoint_path


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def per_image(cam: ShapCAM, x: torch.Tensor, repeat: int = 2) -> float:
    cam(x)
    best = float("inf")
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        cam(x)
        sync()
        best = min(best, time.perf_counter() - t)
    return best / x.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dev = args.device
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, device {dev} ({name})", flush=True)
    weights = "IMAGENET1K_V1" if hub_checkpoint_path().is_file() else "random"
    x, _ = load_batch(bundled_photo_paths())
    cpu = ShapCAM(load_model("mobilenet_v2", weights), permutations=64)(x)
    lm = load_model("mobilenet_v2", weights, device=dev)
    for amp in (False, True):
        r = ShapCAM(lm, permutations=64, amp=amp)(x.to(dev))
        diff = (r.raw.cpu() - cpu.raw).abs().max().item()
        same_targets = bool((r.targets.cpu() == cpu.targets).all())
        print(f"mobilenet_v2 ({weights}) amp={amp}: max |raw_dev - raw_cpu| = {diff:.2e}, "
              f"targets equal: {same_targets}, fast path: {r.extras['fast_path']}", flush=True)

    torch.manual_seed(0)
    vgg = load_model("vgg16", "random", device=dev)
    xv = torch.randn(2, 3, 224, 224, device=dev)
    fast = ShapCAM(vgg, permutations=8, amp=False)(xv)
    slow = ShapCAM(vgg, permutations=8, amp=False, fast_path="off")(xv)
    eff = (fast.raw.sum((1, 2)) - (fast.extras["v_full"] - fast.extras["v_empty"])).abs().max()
    print(f"vgg16 fast vs generic on {dev}: max |diff| = "
          f"{(fast.raw - slow.raw).abs().max().item():.2e} "
          f"(max |raw| {fast.raw.abs().max().item():.2e}); efficiency error {eff.item():.2e}",
          flush=True)
    ampd = ShapCAM(vgg, permutations=8)(xv)
    print(f"vgg16 amp=auto vs fp32: max |diff| = {(ampd.raw - fast.raw).abs().max().item():.2e}",
          flush=True)

    rows = [("mobilenet_v2", lm, x.to(dev), dict(permutations=512)),
            ("vgg16", vgg, torch.randn(4, 3, 224, 224, device=dev), dict(permutations=32)),
            ("vgg16 generic", vgg, torch.randn(4, 3, 224, 224, device=dev),
             dict(permutations=32, fast_path="off")),
            ("vgg16", vgg, torch.randn(4, 3, 224, 224, device=dev), dict(permutations=512))]
    print("| model | options | s/image |\n|---|---|---|")
    for label, model, batch, opts in rows:
        t = per_image(ShapCAM(model, batch_size=8192, **opts), batch)
        print(f"| {label} | {opts} | {t:.4f} |", flush=True)


if __name__ == "__main__":
    main()
