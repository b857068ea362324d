"""Training images: CIFAR-10 from its standard folder, or sklearn's digits as an offline stand-in.

Both give uint8 ``(N, 32, 32, 3)`` images and int64 labels; :func:`batches` yields normalised
float batches with the standard CIFAR augmentation (4-pixel zero padding, random 32x32 crop,
horizontal flip) drawn from a seeded generator, so an epoch's batches depend only on
``(seed, epoch)``: a run resumed from a checkpoint sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ShapCAMError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


@dataclass
class ImageSet:
    """Train and test images of one dataset (uint8 NHWC) with labels and class names."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    flip: bool = True  # horizontal flips are label-preserving (not for digits)


def cifar_folder(root: str | Path) -> Path:
    """``root/cifar-10-batches-py`` or ``root`` itself, checked for every expected file."""
    root = Path(root)
    folder = root if (root / "test_batch").exists() else root / "cifar-10-batches-py"
    missing = [f for f in CIFAR_FILES if not (folder / f).is_file()]
    if missing:
        raise ShapCAMError(
            f"CIFAR-10 not found in {folder}: missing {', '.join(missing)}. Expected the "
            "'cifar-10-batches-py' folder of https://www.cs.toronto.edu/~kriz/cifar.html "
            f"({', '.join(CIFAR_FILES)}), e.g. from torchvision.datasets.CIFAR10(root, "
            "download=True) on a machine with internet access.")
    return folder


class _ArraysOnly(pickle.Unpickler):
    """CIFAR-10's python batches are pickles of dicts of numpy arrays and lists: only the
    globals that rebuild an array may load, so a hostile batch file runs no code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            d = _ArraysOnly(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
        raise ShapCAMError(f"cannot read CIFAR-10 batch {path}: {exc}") from exc
    return data.transpose(0, 2, 3, 1).copy(), labels


def load_cifar10(root: str | Path, limit: int | None = None) -> ImageSet:
    """CIFAR-10 as torchvision's ``CIFAR10(root, download=False)`` reads it; ``limit`` keeps
    the first ``limit`` train and ``limit // 5`` test images (a subset for quick runs)."""
    folder = cifar_folder(root)
    parts = [_read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_batch(folder / "test_batch")
    if limit:
        train_x, train_y = train_x[:limit], train_y[:limit]
        test_x, test_y = test_x[: max(1, limit // 5)], test_y[: max(1, limit // 5)]
    return ImageSet("cifar10", train_x, train_y, test_x, test_y, CIFAR_CLASSES)


def load_digits32(seed: int = 0) -> ImageSet:
    """sklearn's bundled 8x8 digits (1,797 images, offline), upsampled to 32x32 RGB; a fixed
    80/20 split. A stand-in to run the whole experiment on a CPU, not CIFAR-10."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x.repeat(1, 3, 1, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    tr, te = order[:cut], order[cut:]
    return ImageSet("digits", x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)],
                    flip=False)


def load_images(dataset: str, root: str | Path | None = None, limit: int | None = None,
                seed: int = 0) -> ImageSet:
    if dataset == "cifar10":
        if root is None:
            raise ShapCAMError("--root is required for cifar10 (the folder holding "
                               "cifar-10-batches-py)")
        return load_cifar10(root, limit)
    if dataset == "digits":
        return load_digits32(seed)
    raise ShapCAMError(f"unknown dataset {dataset!r}; use cifar10 or digits")


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8-range float NCHW in [0, 1] -> CIFAR-normalised."""
    mean = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool = True,
            pad: int = 4, extra: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random crop after zero padding, and random horizontal flip, per image; ``extra``
    (``(B, H, W)``, e.g. precomputed teacher maps) gets the same crop and flip."""
    B, _, H, W = x.shape
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    flips = (torch.rand(B, generator=generator) < 0.5) if flip else torch.zeros(B, dtype=bool)

    def apply(t: torch.Tensor) -> torch.Tensor:
        padded = F.pad(t, (pad, pad, pad, pad))
        out = torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
        return torch.where(flips.view(B, 1, 1, 1).to(out.device), out.flip(-1), out)

    return apply(x), (apply(extra.unsqueeze(1)).squeeze(1) if extra is not None else None)


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *, seed: int, epoch: int,
            train: bool, flip: bool = True, extra: torch.Tensor | None = None,
            device: str = "cpu"
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """``(x normalised, y, extra or None, indices)`` batches; shuffled and augmented when
    ``train``, from a generator seeded by ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    n = len(labels)
    order = torch.randperm(n, generator=g) if train else torch.arange(n)
    for s in range(0, n, batch_size):
        idx = order[s:s + batch_size]
        x = torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float() / 255
        e = extra[idx] if extra is not None else None
        if train:
            x, e = augment(x, g, flip, extra=e)
        y = torch.from_numpy(labels[idx.numpy()])
        yield (normalise(x).to(device), y.to(device),
               e.to(device) if e is not None else None, idx)
