"""Confidence intervals of permutation-sampled Shapley values that do not assume the marginal
contributions are Gaussian.

``ShapleyResult.stderr`` is ``std / sqrt(K)`` over the sample units (orders, or antithetic
pairs): right in variance, but ``phi +- z * stderr`` is a Gaussian interval, and the marginal
contributions of saliency games are heavy-tailed (a player matters a lot in the rare orders
where it completes a coalition). On such players the sample misses most of the tail, the
standard error is then underestimated, and the Gaussian interval covers less than it says.

:func:`bootstrap_t_interval` (the studentised bootstrap, Efron & Tibshirani 1993, ch. 12)
resamples the units and calibrates ``(phi* - phi) / se*`` on the data, so the interval follows
the skew that a heavy tail gives the mean. Its cost: ``resamples`` means of ``(K, n)`` units,
no game evaluations; it needs the units (``permutation_shapley(..., keep_units=True)``:
``K * n * 8`` bytes per game).
"""

from __future__ import annotations

import torch

from ..errors import ShapCAMError


def bootstrap_t_interval(units: torch.Tensor, level: float = 0.95, resamples: int = 1000,
                         seed: int = 0, chunk: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Bootstrap-t interval of each player's mean contribution: ``(lower, upper)``, ``(n,)``.

    With ``m``, ``s`` the mean and standard error of ``units (K, n)`` and, for each resample
    ``r`` of the ``K`` units with replacement, ``t_r = (m_r - m) / s_r``, the interval is
    ``[m - q(1 - a/2) s, m - q(a/2) s]`` where ``q`` are the quantiles of ``t_r`` and
    ``a = 1 - level``. A resample in which a player's units are all equal has no spread: its
    ``t_r`` counts as 0. A player whose units are all equal gets a zero-width interval (the
    sample saw no variation: more orders are the only remedy).
    """
    if units.dim() != 2 or units.shape[0] < 2:
        raise ShapCAMError(f"the bootstrap needs units (K, n) with K >= 2, got "
                           f"{tuple(units.shape)}")
    if not 0 < level < 1 or resamples < 10:
        raise ShapCAMError(f"level must be in (0, 1) and resamples >= 10, got {level} and "
                           f"{resamples}")
    u = units.double().cpu()
    K = u.shape[0]
    mean, se = u.mean(0), u.std(0) / K ** 0.5
    gen = torch.Generator().manual_seed(seed)
    stats = []
    for start in range(0, resamples, chunk):
        idx = torch.randint(0, K, (min(chunk, resamples - start), K), generator=gen)
        sample = u[idx]  # (R, K, n)
        m_r, s_r = sample.mean(1), sample.std(1) / K ** 0.5
        stats.append(torch.where(s_r > 0, (m_r - mean) / s_r.clamp_min(1e-300),
                                 torch.zeros(())))
    t = torch.cat(stats)
    a = 1 - level
    q_lo, q_hi = torch.quantile(t, torch.tensor([a / 2, 1 - a / 2], dtype=t.dtype), dim=0)
    return mean - q_hi * se, mean - q_lo * se
