"""Wide ResNets for CIFAR (Zagoruyko & Komodakis, BMVC 2016): WRN-d-k.

``depth = 6 n + 4``: a 3x3 stem of 16 channels, three groups of ``n`` pre-activation basic blocks
of ``16 k``, ``32 k``, ``64 k`` channels (strides 1, 2, 2), then BN-ReLU, global average pooling
and a linear classifier. The paper's distillation pair: WRN-40-2 teacher (2.2 M parameters),
WRN-16-2 student (0.7 M). ``features`` ends with the final BN-ReLU (``64 k x 8 x 8`` on 32x32
inputs), the layer every explanation method uses; the head is GAP + FC, so Shap-CAM's exact
fast path applies.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, with a 1x1 shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
                         if cin != cout or stride != 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        y = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(o)))))
        # The projection takes the pre-activated input, as in the reference implementation.
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` for 32x32 inputs; ``features`` -> ``pool`` -> ``fc``."""

    def __init__(self, depth: int = 16, widen: int = 2, num_classes: int = 10,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)]
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                layers.append(BasicBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1],
                                         stride if i == 0 else 1, dropout))
        layers += [nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=False)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.depth, self.widen = depth, widen
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(features), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def wrn(name: str, num_classes: int = 10) -> WideResNet:
    """``"wrn-40-2"`` -> WRN-40-2."""
    try:
        _, depth, widen = name.lower().split("-")
        return WideResNet(int(depth), int(widen), num_classes)
    except ValueError as exc:
        raise ValueError(f"model {name!r}: use wrn-DEPTH-WIDTH, e.g. wrn-40-2 or wrn-16-2 "
                         f"({exc})") from exc


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
