"""A cost model of the paper's protocol: passes per image per method, and seconds per image on
this machine from a short calibration (``shapcam run --dry-run``).

Every method's cost is linear in one knob (RISE: masks; Score-CAM: channels; Mask: iterations;
Shap-CAM: orders; deletion/insertion: steps). The calibration runs the real method on a few
images at two small values of its knob (moved up while they time in the noise), fits
``seconds = a + b * knob`` and evaluates it at the configured value, so fast paths, batching
and the device are in the figure. Grad-CAM, Grad-CAM++ and the Average Drop forwards are timed
as they are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..evaluation.metrics import confidence_metrics, deletion_insertion
from ..methods import build_method
from ..zoo.models import LoadedModel
from ..zoo.preprocessing import INPUT_SIZE
from .cpu import forward_batch

#: A calibration timing shorter than this is taken to be mostly timer and scheduler noise.
NOISE_SECONDS = 0.2
#: method -> (its cost knob, the two calibration values, the default when not configured)
KNOBS: dict[str, tuple[str, tuple[int, int], int]] = {
    "rise": ("n_masks", (4, 12), 8000),
    "scorecam": ("max_channels", (4, 12), 0),  # 0: every channel (resolved per model)
    "mask": ("iterations", (2, 6), 500),
    "shapcam": ("permutations", (8, 64), 512),
}


@dataclass
class MethodCost:
    """Projected cost of one method per image: its maps, and its metrics."""

    method: str
    passes: str  # what it runs per image, in words
    map_seconds: float
    metric_seconds: float

    @property
    def seconds(self) -> float:
        return self.map_seconds + self.metric_seconds


def passes(method: str, options: dict[str, Any], channels: int, players: int,
           causal_steps: int | None) -> str:
    """The passes of ``method`` per image (maps and metrics), as a table cell."""
    o = options
    maps = {
        "gradcam": "1 forward + 1 backward (head)",
        "gradcampp": "1 forward + 1 backward (head)",
        "scorecam": f"1 + {o.get('max_channels') or channels} forwards",
        "rise": f"1 + {o.get('n_masks', 8000)} forwards",
        "mask": f"1 + {o.get('iterations', 500)} x (forward + backward)",
        "shapcam": f"1 trunk forward + {o.get('permutations', 512)} x {players} head "
                   "evaluations",
    }.get(method, "?")
    metrics = "2 forwards (Average Drop)"
    if causal_steps is not None:
        metrics += f" + 2 x {causal_steps + 1} forwards (deletion, insertion)"
    return f"{maps}; {metrics}"


def _timed(device: torch.device, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Best of two timings of ``fn(*args, **kwargs)``, the device's queue drained around
    each."""
    best = float("inf")
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def _linear(t_a: float, t_b: float, a: int, b: int, k: int) -> float:
    """``t(k)`` of the line through ``(a, t_a)`` and ``(b, t_b)``; if timer noise makes the
    slope non-positive, the cost is taken as proportional to the knob (``t_b / b`` per unit)."""
    slope = (t_b - t_a) / (b - a)
    if slope <= 0:
        return t_b / b * k
    return max(0.0, t_a + (k - a) * slope)


def _projected(seconds_at: Callable[[int], float], a: int, b: int, target: int) -> float:
    """Seconds at knob value ``target`` from the line through two timed values ``a < b``.

    A cheap method times in the noise at small knobs (Shap-CAM on MobileNetV2 at 8 and 64
    orders, deletion/insertion at 2 and 6 steps: tens of ms on the 2-core VM, projected a
    third and a sixth of the real cost), so while the upper time is under
    :data:`NOISE_SECONDS` the points move up (x4), up to ``target``, which is then timed
    rather than projected.
    """
    t_a, t_b = seconds_at(a), seconds_at(b)
    while t_b < NOISE_SECONDS and b < target:
        a, t_a = b, t_b
        b = min(4 * b, target)
        t_b = seconds_at(b)
    return t_b if b == target else _linear(t_a, t_b, a, b, target)


def _method_seconds(lm: LoadedModel, method: str, options: dict[str, Any],
                    x: torch.Tensor) -> float:
    cam = build_method(method, lm, options)
    cam(x)  # warm-up: the first call allocates and autotunes
    return _timed(x.device, cam, x)


def _knob_seconds(lm: LoadedModel, method: str, options: dict[str, Any], knob: str,
                  x: torch.Tensor, value: int) -> float:
    return _method_seconds(lm, method, {**options, knob: value}, x)


def calibrate(lm: LoadedModel, methods: Sequence[str],
              method_options: dict[str, dict[str, Any]], causal_step: int | None,
              protocol: str, x: torch.Tensor) -> list[MethodCost]:
    """Seconds per image of each method (maps and metrics) on ``x``'s device, projected from
    runs at two small values of the method's cost knob. ``x``: a batch of real images."""
    B = x.shape[0]
    probe = build_method("gradcam", lm, {})  # its trunk and grid: CNNs and ViTs alike
    with torch.no_grad():
        features = probe.feature_map(probe.trunk(x[:1]))
    channels, players = features.shape[1], features.shape[2] * features.shape[3]
    H, W = x.shape[-2:]
    steps = math.ceil(H * W / causal_step) if causal_step is not None else None
    timed_maps: dict[str, float] = {}
    metric_s = None
    for m in methods:
        options = dict(method_options.get(m, {}))
        if m in KNOBS:
            knob, (a, b), default = KNOBS[m]
            target = options.get(knob) or (channels if m == "scorecam" else default)
            timed_maps[m] = _projected(partial(_knob_seconds, lm, m, options, knob, x), a, b,
                                       target) / B
        else:
            timed_maps[m] = _method_seconds(lm, m, options, x) / B
        if metric_s is None:
            # The metrics cost the same forwards whatever the map: timed once per model.
            result = probe(x)
            metric_s = _metric_seconds(lm, x, result.maps, result.targets, protocol, steps)
    return [MethodCost(m, passes(m, method_options.get(m, {}), channels, players, steps),
                       timed_maps[m], metric_s or 0.0) for m in methods]


def _metric_seconds(lm: LoadedModel, x: torch.Tensor, maps: torch.Tensor,
                    targets: torch.Tensor, protocol: str, steps: int | None) -> float:
    """Seconds per image of Average Drop / Increase (and deletion/insertion at ``steps``)."""
    device, B = x.device, x.shape[0]
    H, W = x.shape[-2:]
    confidence_metrics(lm.model, x, maps, targets, protocol)  # warm-up
    seconds = _timed(device, confidence_metrics, lm.model, x, maps, targets, protocol) / B
    if steps is not None:
        # 2 and 6 steps (moved up out of the noise), then the line at the configured steps
        seconds += _projected(lambda s: _timed(device, deletion_insertion, lm.model, x, maps,
                                               targets, step=math.ceil(H * W / s)),
                              2, 6, steps) / B
    return seconds


def calibration_batch(device: torch.device, batch: int, size: int = INPUT_SIZE) -> torch.Tensor:
    """``batch`` real photos (the bundled ones, repeated) preprocessed to ``size`` x ``size``
    on ``device``."""
    from ..data.images import load_batch
    from ..data.photos import BUNDLED_PHOTOS

    paths = [p.path for p in BUNDLED_PHOTOS]
    x, _ = load_batch([paths[i % len(paths)] for i in range(batch)], size)
    return x.to(device)


def calibration_size(device: torch.device, requested: int | None = None) -> int:
    """Images per calibration batch: the perturbation methods' forward batch on GPU (so the
    figure includes batching), one on CPU (keeps VGG16's calibration to seconds)."""
    if requested is not None:
        return requested
    return 1 if device.type == "cpu" else min(8, forward_batch(device, None))
