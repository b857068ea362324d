"""Reduced precision and memory layout for the forward-heavy methods and metrics.

``precision`` runs every forward and backward of a method or metric under ``torch.autocast``
(``bf16`` or ``fp16``; ``fp32`` is exact float32, the default); maps, softmax and metrics are
still computed in float32 from the autocast logits. ``channels_last`` converts the model's
weights and the inputs to NHWC, which cuDNN's tensor-core convolutions prefer. Both are off by
default: the stored numbers of the paper's tables are float32. ``tests/test_precision.py``
states the tolerances measured against float32.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..errors import ShapCAMError

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}


def check_precision(precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ShapCAMError(f"unknown precision {precision!r}; use one of "
                           f"{', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on ``device`` at ``precision`` (a no-op for ``fp32``)."""
    dtype = check_precision(precision)
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if device_type == "cpu" and dtype is torch.float16:
        raise ShapCAMError("fp16 autocast is for CUDA; on CPU use --precision bf16 or fp32")
    return torch.autocast(device_type, dtype=dtype)


def to_channels_last(model: nn.Module) -> nn.Module:
    """The model's 4-d weights in NHWC (in place); inputs follow with :func:`channels_last`."""
    return model.to(memory_format=torch.channels_last)


def channels_last(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if enabled else x


def batch_for_memory(free_bytes: int, per_image_bytes: int, fraction: float = 0.5,
                     low: int = 16, high: int = 1024) -> int:
    """Images per forward that fill ``fraction`` of ``free_bytes`` of device memory when one
    image's forward holds ``per_image_bytes``, clamped to ``[low, high]``."""
    if per_image_bytes <= 0:
        return high
    return max(low, min(high, int(fraction * free_bytes // per_image_bytes)))


def measured_gpu_batch(model: nn.Module, device: torch.device, size: int = 224,
                       probe: int = 4, precision: str = "fp32") -> int:
    """:func:`batch_for_memory` from a probe forward of ``probe`` images on a CUDA device:
    the peak memory it allocated per image, and the device's free memory now."""
    if device.type != "cuda":
        raise ShapCAMError("measured_gpu_batch needs a CUDA device")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad(), autocast(device, precision):
        model(torch.zeros(probe, 3, size, size, device=device))
    torch.cuda.synchronize(device)
    per_image = (torch.cuda.max_memory_allocated(device) - before) // probe
    free, _ = torch.cuda.mem_get_info(device)
    return batch_for_memory(free, per_image)
