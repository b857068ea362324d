"""Maps derived on read from a method's raw map, for the methods whose raw map is smaller than
the map (every CAM method: 7 x 7 at 224 x 224).

Every method's map is ``minmax(upsample_bilinear(relu(raw)))``
(:func:`shapcam.methods.base.upsample_normalise`), so a table keeps the raw map only (196
bytes a map instead of ~50 KB compressed) and readers compute the map, exactly as the method
did up to float32 rounding, then round it to float16 as stored maps are. This is numpy (the
storage layer imports no torch); ``tests/test_scale.py`` holds it equal to the torch function
within one float16 step.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=32)
def linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, ...]:
    """Bilinear resizing along one axis as PyTorch's ``align_corners=False``: for each output
    position the two source positions and their float32 weights (the same arithmetic as
    :func:`shapcam.methods.base.linear_taps`)."""
    f32 = np.float32
    src = np.maximum(f32(n_in) / f32(n_out) * (np.arange(n_out, dtype=f32) + f32(0.5))
                     - f32(0.5), f32(0))
    lo = src.astype(np.int64)
    hi = np.where(lo < n_in - 1, lo + 1, lo)
    w1 = (src - lo.astype(f32)).astype(f32)
    return lo, hi, (f32(1) - w1).astype(f32), w1


def maps_from_raw(raw: np.ndarray, size: tuple[int, int], eps: float = 1e-12) -> np.ndarray:
    """``(..., h, w)`` raw maps -> ``(..., H, W)`` float16 maps in [0, 1]: ReLU, bilinear
    upsampling to ``size`` (H, W), per-map min-max (a constant map is all zeros), in the
    same float32 operations as :func:`shapcam.methods.base.upsample_normalise`. A raw map
    that is all NaN (an image that failed, a class slot an image lacks) stays NaN, as the
    stored maps' fill value."""
    f32 = np.float32
    x = np.maximum(np.asarray(raw, dtype=f32), f32(0))
    (ylo, yhi, y0, y1), (xlo, xhi, x0, x1) = (linear_taps(n, m) for n, m in
                                              zip(x.shape[-2:], size, strict=True))
    r0, r1 = x[..., ylo, :], x[..., yhi, :]
    t0 = r0[..., xlo] * x0 + r0[..., xhi] * x1
    t1 = r1[..., xlo] * x0 + r1[..., xhi] * x1
    up = t0 * y0[:, None] + t1 * y1[:, None]
    flat = up.reshape(*up.shape[:-2], -1)
    with np.errstate(invalid="ignore"):
        lo = flat.min(axis=-1)[..., None, None]
        span = flat.max(axis=-1)[..., None, None] - lo
        out = np.where(span > eps, (up - lo) / np.maximum(span, f32(eps)), f32(0))
    out[np.isnan(x).all(axis=(-2, -1))] = np.nan
    return out.astype(np.float16)
