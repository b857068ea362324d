"""Shap-CAM (Zheng, Wang, Zhou & Lu, ECCV 2022, arXiv 2208.03608).

Every spatial position ``p = (i, j)`` of the target layer's map ``A (C, h, w)`` is a player; the
worth of a coalition ``S`` is what the head gives for class ``c`` when only ``S`` keeps its
activations and the other positions take the baseline:

    v(S) = softmax(head(A * 1_S + baseline * (1 - 1_S)))[c]          (value="probability")
    phi_p = sum_{S not containing p} |S|! (n - |S| - 1)! / n! * (v(S + p) - v(S)),  n = h * w

estimated by permutation sampling (:mod:`shapcam.methods.shapley`). The map is
``minmax(upsample(ReLU(phi)))``. With ``block=b`` the players are ``b x b`` tiles of positions
(the raw map spreads a tile's value evenly over its positions, so sums are preserved).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ShapCAMError
from ..zoo.heads import CellLinearEvaluator, CellLinearPlan, analyse_head
from ..zoo.models import LoadedModel
from ..zoo.tokens import TokenGame, has_class_token_path
from .base import CAMMethod
from .shapley import ShapleyResult, block_groups, exact_shapley, permutation_shapley

#: Default orders per image. On the eight bundled sample photos with MobileNetV2 (n = 49, plain
#: sampling) K = 512 keeps every image's largest standard error under 5% of its largest |phi|
#: (worst: 4.4%; K = 256 reaches 6.5%); see docs/benchmarks.md. Cost: 512 * 48 + 2 = 24,578
#: evaluations per image, a table lookup each on GAP+FC heads (~0.35 s per image on 2 CPU cores).
DEFAULT_PERMUTATIONS: int = 512

#: Target rows of the fast path's (orders x steps x outputs) buffer per chunk (memory bound).
_FAST_CHUNK_ELEMENTS: int = 1 << 24


class FeatureMaskGame:
    """The Shap-CAM games of a batch: players are (groups of) positions of ``features``.

    ``game(index, masks)`` masks the features of images ``index`` and runs the head;
    ``prefix_values`` uses the exact :class:`~shapcam.zoo.heads.CellLinearEvaluator` when the head
    has a ``pool -> Linear`` front (``plan`` is not None).
    """

    def __init__(self, head: nn.Module, features: torch.Tensor, targets: torch.Tensor,
                 baseline: torch.Tensor, *, value: str = "probability",
                 groups: torch.Tensor | None = None, plan: CellLinearPlan | None = None,
                 amp: bool = False, batch_size: int = 1024) -> None:
        self.head, self.features, self.targets, self.baseline = head, features, targets, baseline
        self.value, self.amp, self.batch_size = value, amp, batch_size
        B, _, h, w = features.shape
        self.n_games, self.n_positions = B, h * w
        self.groups = groups.to(features.device) if groups is not None else None
        self.n_players = int(self.groups.max()) + 1 if groups is not None else h * w
        self.device = features.device
        self.plan = plan
        self._evaluators: dict[int, CellLinearEvaluator] = {}
        if plan is None:
            self.prefix_values = None  # type: ignore[assignment]  # estimator uses masks

    # -- values -------------------------------------------------------------------------
    def _positions(self, masks: torch.Tensor) -> torch.Tensor:
        return masks[..., self.groups] if self.groups is not None else masks

    def _to_value(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        targets = targets.expand(logits.shape[:-1])
        if self.value == "logit":
            return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        # softmax then gather measured 2-3x faster than exp(z_c - logsumexp(z)) on CPU.
        return logits.softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _evaluator(self, b: int) -> CellLinearEvaluator:
        if b not in self._evaluators:
            self._evaluators[b] = CellLinearEvaluator(self.plan, self.features[b],
                                                      self.baseline[b])
        return self._evaluators[b]

    def _rest(self, z: torch.Tensor) -> torch.Tensor:
        rest = self.plan.rest
        if rest is None:
            return z
        flat = z.reshape(-1, z.shape[-1])
        with self._autocast():
            out = torch.cat([rest(c) for c in flat.split(self.batch_size)])
        return out.view(*z.shape[:-1], out.shape[-1])

    @torch.no_grad()
    def __call__(self, index: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        present = self._positions(masks.to(self.device))
        index = index.to(self.device)
        targets = self.targets[index]
        if self.plan is not None:
            out = torch.empty(index.shape[0], dtype=torch.float32, device=self.device)
            for b in index.unique().tolist():
                sel = index == b
                z = self._evaluator(b).logits_for(present[sel])
                out[sel] = self._to_value(self._rest(z), targets[sel])
            return out
        h, w = self.features.shape[-2:]
        m = present.view(-1, 1, h, w).to(self.features.dtype)
        masked = self.features[index] * m + self.baseline[index] * (1 - m)
        with self._autocast():
            logits = self.head(masked)
        return self._to_value(logits, targets)

    def _steps(self, b: int) -> torch.Tensor:
        """Additive heads: the fixed move of z when each player joins, ``(n_players, out)``."""
        step = self._evaluator(b).delta
        if self.groups is not None:
            step = torch.zeros(self.n_players, step.shape[1], dtype=step.dtype,
                               device=step.device).index_add_(0, self.groups, step)
        return step

    @torch.no_grad()
    def prefix_values(self, games: list[int], orders: list[torch.Tensor], v_empty: torch.Tensor,
                      v_full: torch.Tensor) -> list[torch.Tensor]:
        """Values of all prefixes of each game's orders ``(K, n)``: a list of ``(K, n + 1)``.

        ``v_empty``/``v_full`` (one per listed game) are written at both ends of every order:
        they are evaluated once per image, so efficiency holds exactly.
        """
        if self._evaluator(games[0]).additive:
            out = self._prefix_additive(games, orders)
        else:
            out = [self._prefix_cells(b, o) for b, o in zip(games, orders, strict=True)]
        n = self.n_players
        for values, lo, hi in zip(out, v_empty, v_full, strict=True):
            values[:, 0], values[:, n] = lo, hi
        return out

    def _prefix_additive(self, games: list[int], orders: list[torch.Tensor]
                         ) -> list[torch.Tensor]:
        # z(prefix) = z_empty + cumsum of the players' steps, for all images of the batch in
        # one gather, one cumsum and one softmax (per-op overhead dominates per-image calls).
        # z_empty is stored as an extra step 0 of each image, so the gather yields the walk.
        G, (K, n) = len(games), orders[0].shape
        table = torch.cat([torch.stack([self._evaluator(b).z_empty for b in games]).unsqueeze(1),
                           torch.stack([self._steps(b) for b in games])], 1)  # (G, n + 1, out)
        width = table.shape[-1]
        table = table.reshape(G * (n + 1), width)
        order = torch.stack(orders)  # (G, K, n)
        offset = (torch.arange(G, device=self.device) * (n + 1)).view(G, 1, 1)
        targets = self.targets[torch.tensor(games, device=self.device)].view(G, 1, 1)
        out = torch.empty(G, K, n + 1, dtype=torch.float64, device=self.device)
        chunk = max(1, _FAST_CHUNK_ELEMENTS // (n * width * G))
        for s in range(0, K, chunk):
            o = order[:, s:s + chunk]
            # Walk rows: z_empty, then the first n - 1 players (the full set is v_full).
            walk = torch.cat([torch.zeros_like(o[..., :1]), o[..., :-1] + 1], -1) + offset
            z = table[walk].cumsum_(2)  # (G, k, n, out): prefixes 0 .. n - 1
            # Contiguous rows (row 0 included) are cheaper than a strided slice's copy.
            out[:, s:s + o.shape[1], 1:n] = self._to_value(self._rest(z), targets)[:, :, 1:]
        return list(out.unbind(0))

    def _prefix_cells(self, b: int, orders: torch.Tensor) -> torch.Tensor:
        K, n = orders.shape
        ev = self._evaluator(b)
        out = torch.empty(K, n + 1, dtype=torch.float64, device=self.device)
        rank = torch.empty_like(orders)
        rank.scatter_(1, orders, torch.arange(n, device=orders.device).expand(K, n))
        steps = torch.arange(n + 1, device=orders.device).view(1, n + 1, 1)
        width = ev.table.shape[-1]
        chunk = max(1, _FAST_CHUNK_ELEMENTS // ((n + 1) * max(width, ev.n_positions)))
        for s in range(0, K, chunk):
            present = self._positions(rank[s:s + chunk].unsqueeze(1) < steps)  # (k, n+1, pos)
            z = ev.prefix_logits(present)
            out[s:s + z.shape[0]] = self._to_value(self._rest(z), self.targets[b])
        return out


class ShapCAM(CAMMethod):
    """Shap-CAM saliency maps.

    Args:
        model: a :class:`~shapcam.zoo.models.LoadedModel` or an ``nn.Module`` (explained in eval
            mode; the caller's mode is restored after each call).
        target_layer: module whose output positions are the players (default: the model's).
        permutations: orders ``K`` per image (per round when adaptive). Cost: ``K * (n - 1) + 2``
            value evaluations per image; on GAP+FC and VGG heads the fast path makes each
            evaluation a table lookup (plus the layers after the first linear one).
        antithetic: pair each order with its reverse (lower variance at equal cost).
        estimator: ``"permutation"`` (sampling) or ``"exact"`` (``2^n`` coalitions, n <= 16;
            use ``block`` to get there, e.g. a 7x7 map with ``block=2`` has 16 players).
        block: group positions into ``block x block`` tiles (fewer players, coarser map).
        value: ``"probability"`` (the paper: softmax probability of the target) or ``"logit"``.
        baseline: ``"zero"`` (the paper) or ``"mean"`` (each channel's spatial mean).
        tolerance, relative, max_permutations: adaptive mode, see
            :func:`~shapcam.methods.shapley.permutation_shapley`.
        batch_size: coalitions per head call (memory vs speed). Default: 1024, except for the
            generic path on CPU (64): masking a whole feature map per coalition is memory-bound
            there, and ConvNeXt-T's head ran 3-4x faster at 64 than at 1024 (docs/models.md).
        seed: default per-image seed (an image's result depends only on its seed).
        fast_path: ``"auto"`` (use the exact fast path when the head allows it), ``"off"``.
        amp: float16 autocast for head evaluations on CUDA (``"auto"``: on when on CUDA).
    """

    name = "shapcam"
    title = "Shap-CAM"

    def __init__(
        self,
        model: LoadedModel | nn.Module,
        target_layer: str | None = None,
        *,
        permutations: int = DEFAULT_PERMUTATIONS,
        antithetic: bool = False,
        estimator: Literal["permutation", "exact"] = "permutation",
        block: int | tuple[int, int] | None = None,
        value: Literal["probability", "logit"] = "probability",
        baseline: Literal["zero", "mean"] = "zero",
        tolerance: float | None = None,
        relative: bool = False,
        max_permutations: int = 1024,
        batch_size: int | None = None,
        seed: int = 0,
        fast_path: Literal["auto", "off"] = "auto",
        amp: bool | Literal["auto"] = "auto",
    ) -> None:
        super().__init__(model, target_layer)
        if int(permutations) != permutations or permutations < 1:
            raise ShapCAMError(f"permutations must be an integer >= 1, got {permutations!r}")
        if antithetic and permutations % 2:
            raise ShapCAMError(f"antithetic sampling needs an even number of permutations, got "
                               f"{permutations}; use {permutations + 1} or antithetic=False")
        choices = {"estimator": (estimator, ("permutation", "exact")),
                   "value": (value, ("probability", "logit")),
                   "baseline": (baseline, ("zero", "mean")),
                   "fast_path": (fast_path, ("auto", "off"))}
        for key, (got, allowed) in choices.items():
            if got not in allowed:
                raise ShapCAMError(f"{key}={got!r} is not one of {', '.join(allowed)}")
        self.permutations, self.antithetic = int(permutations), antithetic
        self.estimator = estimator
        self.block, self.value, self.baseline = block, value, baseline
        self.tolerance, self.relative, self.max_permutations = tolerance, relative, max_permutations
        self.batch_size, self.seed, self.fast_path = batch_size, seed, fast_path
        self.amp = amp
        self._plans: dict[tuple[int, ...], CellLinearPlan | None] = {}

    def plan_for(self, feature_shape: tuple[int, int, int]) -> CellLinearPlan | None:
        """The fast-path plan of this head for maps of ``(C, h, w)``, or None (generic path)."""
        if self.fast_path == "off":
            return None
        if feature_shape not in self._plans:
            self._plans[feature_shape] = analyse_head(self.head, feature_shape)
        return self._plans[feature_shape]

    def params(self) -> dict[str, Any]:
        """The method's parameters, for provenance records."""
        return {"permutations": self.permutations, "antithetic": self.antithetic,
                "estimator": self.estimator, "block": self.block, "value": self.value,
                "baseline": self.baseline, "tolerance": self.tolerance,
                "relative": self.relative, "max_permutations": self.max_permutations,
                "seed": self.seed, "target_layer": self.target_layer}

    def _baseline(self, features: torch.Tensor) -> torch.Tensor:
        if self.baseline == "mean":
            return features.mean((2, 3), keepdim=True).expand_as(features)
        return torch.zeros_like(features)

    def game(self, features: torch.Tensor, targets: torch.Tensor
             ) -> FeatureMaskGame | TokenGame:
        """The batch of games for these features and targets (exposed for analysis/tests);
        on a vision transformer, the token game (:mod:`shapcam.zoo.tokens`)."""
        _, C, h, w = self.feature_map(features).shape
        groups = block_groups(h, w, self.block) if self.block else None
        if self.tokens:
            if self.baseline != "zero":
                raise ShapCAMError("baseline='mean' has no meaning for tokens: an absent token "
                                   "is removed from attention; use the default")
            fast = self.fast_path == "auto" and has_class_token_path(self.head)
            return TokenGame(self.head, features, targets, value=self.value, groups=groups,
                             fast=fast, batch_size=self.coalition_batch(fast, 4096))
        amp = self.device.type == "cuda" if self.amp == "auto" else bool(self.amp)
        plan = self.plan_for((C, h, w))
        return FeatureMaskGame(self.head, features, targets, self._baseline(features),
                               value=self.value, groups=groups, plan=plan, amp=amp,
                               batch_size=self.coalition_batch(plan is not None, 1024))

    def coalition_batch(self, fast: bool, fast_batch: int) -> int:
        """Coalitions per head call: ``batch_size``, else ``fast_batch`` on a fast path (4096
        on the class-token path, where a row is one token's MLP), 64 for a generic path on
        CPU and 1024 on GPU."""
        if self.batch_size is not None:
            return int(self.batch_size)
        if fast:
            return fast_batch
        return 64 if self.device.type == "cpu" else 1024

    def estimate(self, game: FeatureMaskGame, seeds: Sequence[int]) -> ShapleyResult:
        if self.estimator == "exact":
            return exact_shapley(game, batch_size=game.batch_size)
        return permutation_shapley(
            game, self.permutations, antithetic=self.antithetic, seeds=seeds,
            tolerance=self.tolerance, relative=self.relative,
            max_permutations=self.max_permutations, batch_size=game.batch_size)

    def raw_maps(self, x: torch.Tensor, targets: torch.Tensor, *, features: torch.Tensor,
                 logits: torch.Tensor, seeds: int | Sequence[int] | None = None,
                 **_: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        B, _, h, w = self.feature_map(features).shape
        if seeds is None:
            seeds = self.seed
        seed_list = [int(seeds)] * B if isinstance(seeds, int) else [int(s) for s in seeds]
        if len(seed_list) != B:
            raise ShapCAMError(f"got {len(seed_list)} seeds for a batch of {B} images")
        game = self.game(features, targets)
        res = self.estimate(game, seed_list)
        phi, stderr = res.phi.float(), res.stderr.float()
        if game.groups is not None:
            # Spread a tile's value evenly over its positions (sums are preserved).
            size = torch.bincount(game.groups, minlength=game.n_players).float()
            phi = (phi / size)[:, game.groups]
            stderr = (stderr / size)[:, game.groups]
        raw = phi.view(B, h, w)
        extras = {
            "phi": raw,
            "stderr": stderr.view(B, h, w),
            "v_empty": res.v_empty.float(),
            "v_full": res.v_full.float(),
            "permutations": res.permutations,
            "evaluations": res.evaluations,
            "seed": torch.tensor(seed_list),
            "stopped_by": res.stopped_by,
            "fast_path": game.plan is not None or getattr(game, "fast", False),
            "players": game.n_players,
        }
        return raw, extras
