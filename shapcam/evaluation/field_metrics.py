"""The field's sanity, faithfulness and map-quality metrics, under their Quantus names.

Inputs are those of :mod:`shapcam.evaluation.metrics`: preprocessed batches ``x (B, 3, H, W)``, maps
``(B, H, W)`` in [0, 1], targets ``(B,)``. Each metric is a named family of columns of the
per-image tables (:data:`FIELD_METRICS`), selected with ``--metrics``; each is checked against
Quantus 0.6.0 (and ROAD against pytorch-grad-cam) in the tests, on identical inputs.

- **Sparseness** (Chalasani et al. 2020; ``quantus.Sparseness``): the Gini index of the map,
  ``G = sum_i (2i - n - 1) a_(i) / (n * sum_i a_i)`` over the ``n`` pixels sorted increasingly;
  0 for a uniform map, -> 1 when one pixel holds everything (higher: sparser).
- **Complexity** (Bhatt et al. 2020; ``quantus.Complexity``): the entropy of the map's
  fractional contributions ``p = a / sum a``, ``-sum p log p`` (natural log; 0 log 0 = 0);
  ``log n`` for a uniform map (lower: simpler).
- **Relevance mass accuracy** (Arras et al. 2022): ``sum(a inside the mask) / sum(a)``, the mask
  being the union of the explained class's boxes (no filter: every image with a box).
- **Relevance rank accuracy** (Arras et al. 2022): with ``K`` pixels in the mask, the fraction of
  the ``K`` most salient pixels that lie in it. Pixels tied at the K-th value count by their
  expected share (what a uniformly random tie-break gives on average), so the zero plateaus of
  ReLU'd maps do not make the value depend on pixel positions or sort algorithms.
- **ROAD** (Rong et al. 2022): remove the ``p`` % most (MoRF) or least (LeRF) salient pixels
  (``floor(p * H * W / 100)`` pixels, ties in a seeded order as in deletion/insertion) and fill
  them by *noisy linear imputation*: each removed pixel equals the weighted mean of its 8
  neighbours (weight 1/6 for edge neighbours, 1/12 for corners, those inside the image), one
  sparse linear system per image and percentage solved for all channels at once, plus Gaussian
  noise (``noise`` = 0.01, in the model's input space as both references; seeded per image).
  Per percentage: does the model still predict the target? Stored per image: the fraction of
  the percentages (default 10, 20, ..., 90) at which it does, ``road_morf`` (lower is better)
  and ``road_lerf`` (higher is better); ``100 * mean`` over images is Quantus's accuracy curve
  averaged over percentages.
- **Model parameter randomisation test** (Adebayo et al. 2018; ``quantus.MPRT``): the model's
  layers that have parameters (modules with ``reset_parameters``, as Quantus) are re-initialised
  from the top down, cascading, with Quantus's seeding; the method explains the same images with
  the model randomised down to each checkpoint depth (``depths``, fractions of the layers:
  default the top layer, half and all of them) and the map is compared with the original by
  Spearman rank correlation and SSIM (scikit-image, 7 x 7 window). Stored per image: the means
  over the checkpoints, ``mprt_spearman`` and ``mprt_ssim``. A method that passes the sanity
  check gives *low* values (its maps depend on the parameters). Costs one explanation per
  checkpoint and image.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ShapCAMError
from ..runtime.cpu import forward_batch
from .metrics import box_mask, saliency_order

#: ``--metrics`` names -> the per-image columns each one fills.
FIELD_METRICS: dict[str, tuple[str, ...]] = {
    "sparseness": ("sparseness",),
    "complexity": ("complexity",),
    "localisation": ("rank_accuracy", "mass_accuracy"),
    "road": ("road_morf", "road_lerf"),
    "mprt": ("mprt_spearman", "mprt_ssim"),
}
ROAD_PERCENTAGES: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ROAD_NOISE = 0.01
MPRT_DEPTHS: tuple[float, ...] = (0.0, 0.5, 1.0)  # 0.0 is the top layer alone
MPRT_SEED = 42  # Quantus's default

#: Neighbour offsets (dy, dx) and weights of the linear imputation (Rong et al. 2022).
_NEIGHBOURS = (((0, 1), 1 / 6), ((0, -1), 1 / 6), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
               ((1, 1), 1 / 12), ((1, -1), 1 / 12), ((-1, 1), 1 / 12), ((-1, -1), 1 / 12))
# reset_parameters draws from torch's global generator: one randomisation at a time per process.
_RANDOMISE_LOCK = threading.Lock()


def check_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` validated against :data:`FIELD_METRICS` (``all`` expands), in that order."""
    wanted = set(names)
    if "all" in wanted:
        wanted = set(FIELD_METRICS)
    unknown = sorted(wanted - set(FIELD_METRICS))
    if unknown:
        raise ShapCAMError(f"unknown metric {unknown[0]!r}; --metrics takes "
                           f"{', '.join(FIELD_METRICS)} or all (comma-separated)")
    return tuple(m for m in FIELD_METRICS if m in wanted)


def _flat(maps: torch.Tensor) -> torch.Tensor:
    return maps.reshape(maps.shape[0], -1).double().abs()


def sparseness(maps: torch.Tensor) -> torch.Tensor:
    """Per map, the Gini index of its pixels (NaN for an all-zero map)."""
    a = _flat(maps).sort(dim=1).values
    n = a.shape[1]
    i = torch.arange(1, n + 1, dtype=a.dtype, device=a.device)
    total = a.sum(1)
    gini = ((2 * i - n - 1) * a).sum(1) / (n * total)
    return torch.where(total > 0, gini, torch.full_like(gini, math.nan)).float()


def complexity(maps: torch.Tensor) -> torch.Tensor:
    """Per map, the entropy of ``a / sum(a)`` in nats (NaN for an all-zero map)."""
    a = _flat(maps)
    total = a.sum(1, keepdim=True)
    p = a / total.clamp_min(1e-300)
    ent = -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(1)
    return torch.where(total.squeeze(1) > 0, ent, torch.full_like(ent, math.nan)).float()


def class_masks(boxes: Sequence[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """``(B, H, W)`` bool: the union of each image's boxes ``(k, 4)`` (empty: no box)."""
    out = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for i, b in enumerate(boxes):
        b = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4)
        if b.shape[0]:
            out[i] = box_mask(b, height, width)
    return out


def relevance_mass_accuracy(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per map, the share of its mass inside ``masks`` (NaN: empty mask or all-zero map)."""
    a = _flat(maps)
    s = masks.reshape(masks.shape[0], -1).to(a.device)
    total = a.sum(1)
    inside = (a * s).sum(1)
    ok = (s.sum(1) > 0) & (total > 0)
    return torch.where(ok, inside / total.clamp_min(1e-300),
                       torch.full_like(total, math.nan)).float()


def relevance_rank_accuracy(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per map, the fraction of its ``K = |mask|`` top pixels inside the mask, pixels tied at the
    K-th value counted by their expected share (NaN: empty mask)."""
    a = _flat(maps)
    s = masks.reshape(masks.shape[0], -1).to(a.device)
    out = torch.full((a.shape[0],), math.nan, dtype=torch.float64, device=a.device)
    for i in range(a.shape[0]):
        k = int(s[i].sum())
        if k == 0:
            continue
        kth = a[i].sort(descending=True).values[k - 1]
        above, tied = a[i] > kth, a[i] == kth
        hits = (above & s[i]).sum().double()
        share = (tied & s[i]).sum().double() / tied.sum().double()
        out[i] = (hits + (k - above.sum()) * share) / k
    return out.float()


def linear_imputation(x: torch.Tensor, removed: torch.Tensor, noise: float = 0.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``x (C, H, W)`` with the pixels where ``removed (H, W)`` is true replaced by the solution
    of ``x_p = sum_q w_q x_q / sum_q w_q`` over each pixel's neighbours ``q`` in the image (the
    removed ones are unknowns too), plus ``noise * N(0, 1)`` (see the module docstring)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    C, H, W = x.shape
    gone = removed.reshape(-1).cpu().numpy().astype(bool)
    unknown = np.flatnonzero(gone)
    m = unknown.size
    if m == 0:
        return x.clone()
    if m == H * W:
        raise ShapCAMError("linear imputation needs at least one pixel kept")
    var = np.full(H * W, -1)
    var[unknown] = np.arange(m)
    values = x.reshape(C, -1).double().cpu().numpy()
    r, c = np.divmod(unknown, W)
    rows, cols, data = [], [], []
    rhs = np.zeros((m, C))
    diag = np.zeros(m)
    for (dy, dx), w in _NEIGHBOURS:
        rr, cc = r + dy, c + dx
        inside = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        q = np.where(inside, rr * W + cc, 0)
        diag += w * inside
        is_unknown = inside & gone[q]
        rows.append(np.flatnonzero(is_unknown))
        cols.append(var[q[is_unknown]])
        data.append(np.full(int(is_unknown.sum()), -w))
        known = inside & ~gone[q]
        rhs[known] += w * values[:, q[known]].T
    a = coo_matrix((np.concatenate([diag, *data]),
                    (np.concatenate([np.arange(m), *rows]), np.concatenate([np.arange(m), *cols]))),
                   shape=(m, m)).tocsc()
    solved = spsolve(a, rhs).reshape(m, C)
    out = values.copy()
    out[:, unknown] = solved.T
    result = torch.from_numpy(out).to(x.dtype).reshape(C, H, W)
    if noise:
        eps = torch.randn(C, m, generator=generator, dtype=torch.float64).to(x.dtype)
        result.reshape(C, -1)[:, torch.from_numpy(unknown)] += noise * eps
    return result.to(x.device)


def road(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
         percentages: Sequence[float] = ROAD_PERCENTAGES, noise: float = ROAD_NOISE,
         seeds: Sequence[int] | int = 0, batch_size: int | None = None
         ) -> dict[str, torch.Tensor]:
    """Per image ``road_morf``/``road_lerf`` (fractions of ``percentages`` at which the target
    is still predicted) and the ``(B, P)`` predictions behind them (``morf_kept``,
    ``lerf_kept``, bool). ``seeds`` (per image, or one) break ties and draw the noise."""
    B, _, H, W = x.shape
    seeds = [seeds] * B if isinstance(seeds, int) else list(seeds)
    order = saliency_order(maps.to(x.device), seeds).cpu()
    per = forward_batch(x.device, batch_size)
    targets = targets.to(x.device).long()
    out: dict[str, torch.Tensor] = {}
    for name, ranks in (("morf", order), ("lerf", order.flip(1))):
        images = []
        for b in range(B):
            gen = torch.Generator().manual_seed(int(seeds[b]) + (name == "lerf"))
            for p in percentages:
                removed = torch.zeros(H * W, dtype=torch.bool)
                removed[ranks[b, : int(H * W * p / 100)]] = True
                images.append(linear_imputation(x[b].float().cpu(), removed.view(H, W), noise,
                                                gen))
        stack = torch.stack(images).to(x.device, x.dtype)
        with torch.no_grad():
            pred = torch.cat([model(stack[s:s + per]).argmax(1)
                              for s in range(0, stack.shape[0], per)])
        kept = pred.view(B, len(percentages)) == targets.view(-1, 1)
        out[f"{name}_kept"] = kept
        out[f"road_{name}"] = kept.float().mean(1)
    return out


def randomisable_layers(model: nn.Module) -> list[str]:
    """Names of the modules MPRT re-initialises, top (output side) first: those with
    ``reset_parameters``, in ``named_modules`` order reversed (as Quantus)."""
    return [n for n, m in model.named_modules() if hasattr(m, "reset_parameters")][::-1]


def mprt_depths(n_layers: int, fractions: Sequence[float] = MPRT_DEPTHS) -> list[int]:
    """Checkpoint depths (layers randomised, >= 1) for fractions of ``n_layers``."""
    if n_layers < 1:
        raise ShapCAMError("the model has no layer with parameters to randomise")
    for f in fractions:
        if not 0 <= f <= 1:
            raise ShapCAMError(f"MPRT depth {f!r} is not a fraction in [0, 1]")
    return sorted({max(1, round(f * n_layers)) for f in fractions})


def randomised_copy(model: nn.Module, depth: int, seed: int = MPRT_SEED) -> nn.Module:
    """A copy of ``model`` with its ``depth`` top layers re-initialised, cascading, exactly as
    Quantus's top-down generator does at step ``depth - 1`` (``torch.manual_seed(seed + 1)``
    before each layer's ``reset_parameters``); the global RNG state is restored after."""
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    with _RANDOMISE_LOCK, torch.random.fork_rng(devices=[]):
        for name in randomisable_layers(clone)[:depth]:
            torch.manual_seed(seed + 1)
            modules[name].reset_parameters()
    return clone.eval()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per pair of maps, Spearman's rank correlation (average ranks for ties; NaN when a map is
    constant)."""
    from scipy.stats import spearmanr

    a_np, b_np = (t.reshape(t.shape[0], -1).double().cpu().numpy() for t in (a, b))
    out = []
    for u, v in zip(a_np, b_np, strict=True):
        if np.ptp(u) == 0 or np.ptp(v) == 0:
            out.append(math.nan)
        else:
            out.append(float(spearmanr(u, v)[0]))
    return torch.tensor(out)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per pair of 2-D maps, SSIM (scikit-image, 7 x 7 window, data range of the pair, as
    Quantus's ``ssim``)."""
    from skimage.metrics import structural_similarity

    out = []
    for u, v in zip(a.double().cpu().numpy(), b.double().cpu().numpy(), strict=True):
        span = float(max(u.max(), v.max()) - min(u.min(), v.min()))
        out.append(math.nan if span == 0 else
                   float(structural_similarity(u, v, data_range=span)))
    return torch.tensor(out)


def mprt_scores(maps: torch.Tensor, randomised: Sequence[torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """Per image, the mean over checkpoints of Spearman and SSIM between ``maps`` and the maps
    of each randomised model (``randomised``: one ``(B, H, W)`` per checkpoint).

    Both columns average every checkpoint. A randomised model whose map is constant kept no
    ranking of the original: its Spearman counts as 0 (no association, a pass) instead of
    being undefined and dropped, which would leave the mean to the other checkpoints. A
    constant original map has no ranking to test: its Spearman is NaN (SSIM stays defined).
    """
    if not randomised:
        raise ShapCAMError("MPRT needs the maps of at least one randomised model")
    flat = maps.reshape(maps.shape[0], -1)
    ranked = (flat.amax(1) > flat.amin(1)).cpu()  # the original has a ranking
    rhos = []
    for r in randomised:
        rf = r.reshape(r.shape[0], -1)
        flat_r = (rf.amax(1) == rf.amin(1)).cpu()
        rhos.append(torch.where(ranked & flat_r, torch.zeros(()), spearman(maps, r).float()))
    rho = torch.stack(rhos).mean(0)
    sim = torch.stack([ssim(maps, r).float() for r in randomised]).mean(0)
    return {"mprt_spearman": rho, "mprt_ssim": sim}


def field_scores(maps: torch.Tensor, boxes: Sequence[torch.Tensor], metrics: Sequence[str],
                 *, model: nn.Module | None = None, x: torch.Tensor | None = None,
                 targets: torch.Tensor | None = None, seeds: Sequence[int] | int = 0,
                 randomised: Sequence[torch.Tensor] | None = None,
                 road_percentages: Sequence[float] = ROAD_PERCENTAGES,
                 road_noise: float = ROAD_NOISE, batch_size: int | None = None
                 ) -> dict[str, torch.Tensor]:
    """Every column of the ``metrics`` families for one batch: ``{column: (B,)}``. ``boxes``:
    the explained class's boxes per image (localisation); ``model``, ``x``, ``targets``: ROAD;
    ``randomised``: the maps of the randomised models (MPRT)."""
    out: dict[str, torch.Tensor] = {}
    maps = maps.float()
    if "sparseness" in metrics:
        out["sparseness"] = sparseness(maps)
    if "complexity" in metrics:
        out["complexity"] = complexity(maps)
    if "localisation" in metrics:
        masks = class_masks(boxes, *maps.shape[-2:])
        out["rank_accuracy"] = relevance_rank_accuracy(maps, masks)
        out["mass_accuracy"] = relevance_mass_accuracy(maps, masks)
    if "road" in metrics:
        if model is None or x is None or targets is None:
            raise ShapCAMError("ROAD needs the model, the images and the targets")
        r = road(model, x, maps, targets, road_percentages, road_noise, seeds, batch_size)
        out["road_morf"], out["road_lerf"] = r["road_morf"], r["road_lerf"]
    if "mprt" in metrics:
        if randomised is None:
            raise ShapCAMError("MPRT needs the maps of the randomised models")
        out.update(mprt_scores(maps, randomised))
    return {k: v.float().cpu() for k, v in out.items()}
