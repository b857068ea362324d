"""CPU memory-allocator tuning for many large, short-lived tensors.

The perturbation methods and the causal metrics run thousands of forward passes whose activation
tensors (MBs each) are allocated and freed per batch. With glibc's defaults, blocks above the
mmap threshold and memory trimmed from the heap top go back to the kernel at every free, so each
new batch page-faults its memory in again: on a 2-core VM more time went to the kernel (zeroing
pages) than to the convolutions (``docs/benchmarks.md``, "CPU allocator"). Raising the mmap
threshold to its maximum and never trimming keeps that memory in the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX = 32 * 1024 * 1024  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
_done = False


def tune_allocator() -> bool:
    """Set glibc's mmap threshold to 32 MiB and disable heap trimming in this process.

    Idempotent; a no-op (returns False) off Linux/glibc. Memory freed by torch stays in the
    process for reuse, so its resident size stays at its peak instead of shrinking.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX) == 1
    ok = (mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1) and ok
    _done = ok
    return ok


#: Images per forward pass of the perturbation methods and causal metrics when not given. On
#: CPU small batches keep every activation below the mmap threshold (reused, no page faults)
#: and in cache: batch 4 ran Score-CAM 3-4x faster than batch 64 on the 2-core VM. On GPU
#: large batches fill the device.
CPU_FORWARD_BATCH = 4
GPU_FORWARD_BATCH = 64


def forward_batch(device: str | object, requested: int | None) -> int:
    """``requested`` when given, else the default for ``device`` (a torch.device or str)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"batch_size must be >= 1, got {requested}")
        return requested
    return CPU_FORWARD_BATCH if str(device).startswith("cpu") else GPU_FORWARD_BATCH
