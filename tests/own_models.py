"""A user's own models, as a project of theirs would define them: loaded by import path
(``own_models:three_shapes``) in tests/test_own_data.py, by the command and its Dask workers."""

from __future__ import annotations

import torch
from torch import nn

SHAPES = ["circle", "square", "triangle"]
#: The three-class model's own normalisation (not ImageNet's).
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class TinyNet(nn.Module):
    """Two conv stages down to an 8 x 8 map at 64 x 64 (the paper's models have 7 x 7), global
    average pooling and a linear classifier."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def colour_detector() -> TinyNet:
    """A TinyNet whose weights are set by hand to tell the shapes by colour (circle red,
    square green, triangle blue), as a trained one would: a model with real evidence, so its
    maps are not constant."""
    net = TinyNet(3)
    conv1, conv2 = net.features[0], net.features[3]
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for c in range(3):
            conv1.weight[c, :, 1, 1] = -0.5
            conv1.weight[c, c, 1, 1] = 1.0  # channel c: its colour minus the other two
            conv2.weight[c, c, 1, 1] = 1.0
            net.fc.weight[c, c] = 10.0
    return net


def three_shapes() -> dict:
    """A 3-class CNN at 64 x 64 with its own mean/std and class names."""
    return {"model": colour_detector(), "target_layer": "features", "categories": SHAPES,
            "input_size": 64, "mean": MEAN, "std": STD}


def cifar_wrn() -> dict:
    """A CIFAR network at 32 x 32: the distillation student WRN-16-1 (10 classes)."""
    from shapcam.training.wrn import wrn

    return {"model": wrn("wrn-16-1"), "input_size": 32,
            "mean": (0.4914, 0.4822, 0.4465), "std": (0.247, 0.243, 0.261)}


def mobilenet_299() -> dict:
    """torchvision's MobileNetV3-Small with random weights at a 299 x 299 input (Inception v3's
    size; Inception itself costs 20x more per forward on CPU, too slow for the test suite)."""
    import torchvision

    return {"model": torchvision.models.mobilenet_v3_small(weights=None, num_classes=5),
            "input_size": 299}


class Gated(TinyNet):
    """A head with a data-dependent branch after the target layer: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if float(f.detach().mean()) > 1e6:  # never true; a Python branch on a value
            f = f * 0
        return self.fc(torch.flatten(self.pool(f), 1))


def untraceable() -> dict:
    return {"model": Gated(3), "target_layer": "features", "input_size": 48}


def plain_module() -> nn.Module:
    """A bare nn.Module: every metadata key defaults (224, ImageNet statistics, found layer)."""
    return TinyNet(4)


def not_a_model() -> str:
    return "a string"
