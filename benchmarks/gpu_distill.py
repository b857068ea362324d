"""Seconds per training epoch of the distillation configurations on a GPU (for the GPU-hour
estimate of Table 4), on random CIFAR-sized data (50,000 train, 10,000 test images).

    python benchmarks/gpu_distill.py [--images 50000] [--device cuda]

Times one epoch of the WRN-40-2 teacher (cross-entropy) and of the WRN-16-2 student with each
loss (with KD), with precomputed random teacher maps, and the teacher's map precomputation per
method on the training images.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from tempfile import mkdtemp

import numpy as np
import torch

from shapcam.training.cifar import ImageSet
from shapcam.training.distillation import Variant, train_student, train_teacher
from shapcam.training.maps import teacher_maps
from shapcam.training.train import Checkpoint, Schedule
from shapcam.training.wrn import wrn


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev, n = args.device, args.images
    rng = np.random.default_rng(0)
    data = ImageSet("random", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                    rng.integers(0, 10, n), rng.integers(0, 256, (n // 5, 32, 32, 3),
                                                         dtype=np.uint8),
                    rng.integers(0, 10, n // 5), [str(i) for i in range(10)])
    tmp = Path(mkdtemp())
    one = Schedule(epochs=1, milestones=())
    torch.manual_seed(0)
    teacher = wrn("wrn-40-2")
    t = time.perf_counter()
    train_teacher(teacher, data, one, Checkpoint(tmp / "t.pt"), device=dev)
    sync(dev)
    print(f"{torch.cuda.get_device_name() if dev.startswith('cuda') else 'cpu'}, {n} images")
    print(f"| teacher WRN-40-2, 1 epoch (CE) | {time.perf_counter() - t:.1f} s |")
    teacher.eval()
    x = torch.from_numpy(data.train_x[:10_000]).permute(0, 3, 1, 2).float().div(255).to(dev)
    y = torch.from_numpy(data.train_y[:10_000]).to(dev)
    for method in ("gradcam", "gradcampp", "scorecam", "shapcam"):
        sync(dev)
        t = time.perf_counter()
        teacher_maps(teacher, method, x, y)
        sync(dev)
        print(f"| teacher {method} maps, per 10,000 images | {time.perf_counter() - t:.1f} s |")
    maps = torch.rand(n, 32, 32).half()
    for method in (None, "gradcam", "gradcampp", "scorecam", "shapcam"):
        torch.manual_seed(1)
        student = wrn("wrn-16-2")
        v = Variant(method, True)
        sync(dev)
        t = time.perf_counter()
        train_student(student, teacher, data, v, one, Checkpoint(tmp / f"{v.name}.pt"),
                      teacher_maps=maps if method else None, device=dev)
        sync(dev)
        print(f"| student WRN-16-2 {v.name}, 1 epoch | {time.perf_counter() - t:.1f} s |")


if __name__ == "__main__":
    main()
