"""Shapley value estimators for batches of cooperative games.

A *game* here is a batch of ``B`` games with the same ``n`` players, evaluated in bulk:

    game(index, masks) -> values        index: (M,) long, which game; masks: (M, n) bool

so that one call can mix coalitions of several images (one forward pass of a CNN head).
A game may also offer ``prefix_values(games, orders, v_empty, v_full) -> [(K, n + 1), ...]``:
the values of every prefix of each order of the listed games, which a structured head computes
far faster than mask by mask (see :mod:`shapcam.zoo.heads`). Any plain ``v(masks) -> values``
becomes a game with :class:`FunctionGame`.

Estimators (all satisfy efficiency, ``sum(phi) == v(N) - v(empty)``, on every sample):

* :func:`permutation_shapley` -- Castro, Gomez & Tejada (2009): ``K`` orders drawn independently
  per game; each player gets its marginal contribution ``v(P + i) - v(P)`` where ``P`` are the
  players before it; ``phi`` is the mean, the standard error ``std / sqrt(K)``. With
  ``antithetic=True`` each order is paired with its reverse and the pair mean is the sample unit.
  ``tolerance`` makes it adaptive: orders are drawn in rounds until every player's standard error
  is at most ``tolerance`` or ``max_permutations`` is reached. The standard error is right in
  variance, but ``phi +- z * se`` is a Gaussian interval that heavy-tailed games undercover;
  ``keep_units=True`` and :meth:`ShapleyResult.interval` give a bootstrap-t interval instead
  (:mod:`shapcam.methods.intervals`).
  Cost per game: ``2 + K * (n - 1)`` evaluations (``v(empty)``, ``v(N)`` once per game).
* :func:`exact_shapley` -- enumeration of the ``2^n`` coalitions, ``n <= 16``:
  ``phi_i = sum_{S not containing i} |S|! (n - |S| - 1)! / n! * (v(S + i) - v(S))``.

Randomness: game ``b`` draws its orders from ``torch.Generator().manual_seed(seeds[b])`` on the
CPU, so a game's estimate depends only on its own seed, never on the batch it is evaluated in or
on the device; and the first ``K`` orders of an adaptive run are those of a fixed-``K`` run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..errors import ShapCAMError

#: Largest number of players :func:`exact_shapley` enumerates (2^16 = 65,536 coalitions).
MAX_EXACT_PLAYERS: int = 16


@runtime_checkable
class Game(Protocol):
    """``B`` cooperative games with ``n`` players each, evaluated in bulk."""

    n_players: int
    n_games: int

    def __call__(self, index: torch.Tensor, masks: torch.Tensor) -> torch.Tensor: ...


class FunctionGame:
    """Wraps ``v(masks) -> values`` (one game) or ``v(index, masks) -> values`` (several)."""

    def __init__(self, fn: Callable[..., torch.Tensor], n_players: int, n_games: int = 1,
                 *, indexed: bool = False) -> None:
        if n_players < 1:
            raise ShapCAMError(f"a game needs at least one player, got n_players={n_players}")
        self.fn, self.n_players, self.n_games, self.indexed = fn, n_players, n_games, indexed

    def __call__(self, index: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        out = self.fn(index, masks) if self.indexed else self.fn(masks)
        return torch.as_tensor(out).reshape(-1)


@dataclass
class ShapleyResult:
    """Estimates for ``B`` games of ``n`` players (tensors on the games' device)."""

    phi: torch.Tensor  # (B, n) signed Shapley values
    stderr: torch.Tensor  # (B, n) standard error of phi (0 for exact, nan with one sample)
    v_empty: torch.Tensor  # (B,)
    v_full: torch.Tensor  # (B,)
    permutations: torch.Tensor  # (B,) orders used (2^n coalitions for exact: -1)
    evaluations: torch.Tensor  # (B,) value-function evaluations per game
    stopped_by: list[str]  # per game: "fixed", "tolerance", "max_permutations", "exact"
    #: per game, the sample units' marginal contributions ``(K, n)`` (``keep_units=True``)
    units: list[torch.Tensor] | None = None

    def interval(self, level: float = 0.95, resamples: int = 1000, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lower, upper)``, each ``(B, n)``: a bootstrap-t interval per player
        (:func:`~shapcam.methods.intervals.bootstrap_t_interval`), honest on heavy-tailed
        games where ``phi +- z * stderr`` covers less than it says. Exact results: ``phi``."""
        from .intervals import bootstrap_t_interval

        if self.stopped_by and all(s == "exact" for s in self.stopped_by):
            return self.phi, self.phi
        if self.units is None:
            raise ShapCAMError("intervals need the sample units: pass keep_units=True to "
                               "permutation_shapley")
        bounds = [bootstrap_t_interval(u, level, resamples, seed) for u in self.units]
        return (torch.stack([b[0] for b in bounds]).to(self.phi.device),
                torch.stack([b[1] for b in bounds]).to(self.phi.device))


def _evaluate(game: Game, index: torch.Tensor, masks: torch.Tensor, batch_size: int
              ) -> torch.Tensor:
    """Evaluate many coalitions in chunks of ``batch_size`` and concatenate (float64 out)."""
    out = []
    for start in range(0, masks.shape[0], batch_size):
        values = game(index[start:start + batch_size], masks[start:start + batch_size])
        out.append(values.detach().to(torch.float64))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def _check_game(game: Game | Callable[..., torch.Tensor], n_players: int | None) -> Game:
    if isinstance(game, Game):
        return game
    if n_players is None:
        raise ShapCAMError("pass n_players when the game is a plain function v(masks)")
    return FunctionGame(game, n_players)


def _endpoints(game: Game, device: torch.device, batch_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    B, n = game.n_games, game.n_players
    index = torch.arange(B, device=device).repeat(2)
    masks = torch.zeros(2 * B, n, dtype=torch.bool, device=device)
    masks[B:] = True
    values = _evaluate(game, index, masks, batch_size)
    return values[:B], values[B:]


def draw_orders(generator: torch.Generator, k: int, n: int, antithetic: bool) -> torch.Tensor:
    """``k`` random orders of ``n`` players (CPU, long); antithetic: pairs (order, reverse)."""
    if not antithetic:
        return torch.rand(k, n, generator=generator).argsort(dim=1)
    half = torch.rand(k // 2, n, generator=generator).argsort(dim=1)
    return torch.stack([half, half.flip(1)], dim=1).reshape(k, n)


def prefix_masks(orders: torch.Tensor) -> torch.Tensor:
    """Coalitions of the inner prefixes of each order: ``(K, n - 1, n)`` bool.

    Row ``t - 1`` of order ``k`` holds the first ``t`` players of the order, ``t = 1 .. n - 1``.
    """
    K, n = orders.shape
    rank = torch.empty_like(orders)
    rank.scatter_(1, orders, torch.arange(n, device=orders.device).expand(K, n))
    steps = torch.arange(1, n, device=orders.device).view(1, n - 1, 1)
    return rank.unsqueeze(1) < steps


def _prefix_values_generic(game: Game, orders: list[torch.Tensor], games: list[int],
                           v_empty: torch.Tensor, v_full: torch.Tensor, batch_size: int,
                           device: torch.device) -> list[torch.Tensor]:
    """Values of all prefixes for several games in shared evaluation batches."""
    n = game.n_players
    index, masks, sizes = [], [], []
    for b, o in zip(games, orders, strict=True):
        m = prefix_masks(o.to(device)).reshape(-1, n)
        index.append(torch.full((m.shape[0],), b, device=device, dtype=torch.long))
        masks.append(m)
        sizes.append(m.shape[0])
    if n > 1:
        flat = _evaluate(game, torch.cat(index), torch.cat(masks), batch_size)
        inner = flat.split(sizes)
    else:
        inner = [torch.empty(0, dtype=torch.float64, device=device) for _ in games]
    out = []
    for b, o, values in zip(games, orders, inner, strict=True):
        K = o.shape[0]
        full = torch.empty(K, n + 1, dtype=torch.float64, device=device)
        full[:, 0] = v_empty[b]
        full[:, n] = v_full[b]
        full[:, 1:n] = values.view(K, n - 1)
        out.append(full)
    return out


def marginal_contributions(orders: torch.Tensor, prefix_values: torch.Tensor) -> torch.Tensor:
    """Per order, each player's marginal contribution: ``(K, n)`` indexed by player."""
    steps = prefix_values.diff(dim=1)  # (K, n) by step
    contrib = torch.empty_like(steps)
    contrib.scatter_(1, orders.to(steps.device), steps)
    return contrib


class _Accumulator:
    """Running sums of per-unit estimates (a unit is an order, or an antithetic pair)."""

    def __init__(self, n: int, device: torch.device, keep: bool = False) -> None:
        self.units: list[torch.Tensor] | None = [] if keep else None
        self.count = 0
        self.total = torch.zeros(n, dtype=torch.float64, device=device)
        self.total_sq = torch.zeros(n, dtype=torch.float64, device=device)

    def add(self, units: torch.Tensor) -> None:
        if self.units is not None:
            self.units.append(units.detach().to(torch.float64).cpu())
        self.count += units.shape[0]
        self.total += units.sum(0)
        self.total_sq += (units * units).sum(0)

    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def stderr(self) -> torch.Tensor:
        if self.count < 2:
            return torch.full_like(self.total, float("nan"))
        mean = self.mean()
        var = (self.total_sq - self.count * mean * mean).clamp_min(0) / (self.count - 1)
        return (var / self.count).sqrt()


def _check_seeds(seeds: int | Sequence[int] | torch.Tensor | None, B: int) -> list[int]:
    if seeds is None:
        seeds = 0
    if isinstance(seeds, int):
        return [seeds] * B
    seeds = [int(s) for s in seeds]
    if len(seeds) != B:
        raise ShapCAMError(f"got {len(seeds)} seeds for {B} games; pass one per game or an int")
    return seeds


def _check_sampling(permutations: int, antithetic: bool, tolerance: float | None,
                    max_permutations: int, batch_size: int) -> None:
    if int(permutations) != permutations or permutations < 1:
        raise ShapCAMError(f"permutations must be an integer >= 1, got {permutations!r}")
    if antithetic and permutations % 2:
        raise ShapCAMError(f"antithetic sampling needs an even number of permutations, "
                           f"got {permutations}; use {permutations + 1}")
    if tolerance is not None and (tolerance <= 0 or max_permutations < permutations):
        raise ShapCAMError(f"adaptive mode needs tolerance > 0 and max_permutations >= "
                           f"permutations, got {tolerance} and {max_permutations}")
    if batch_size < 1:
        raise ShapCAMError(f"batch_size must be >= 1, got {batch_size}")


def permutation_shapley(
    game: Game | Callable[..., torch.Tensor],
    permutations: int = 32,
    *,
    n_players: int | None = None,
    antithetic: bool = False,
    seeds: int | Sequence[int] | torch.Tensor | None = 0,
    tolerance: float | None = None,
    relative: bool = False,
    max_permutations: int = 1024,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
    keep_units: bool = False,
) -> ShapleyResult:
    """Permutation-sampling Shapley values (Castro et al. 2009), batched over games.

    Args:
        game: a :class:`Game`, or a function ``v(masks) -> values`` with ``n_players``.
        permutations: orders ``K`` per game (per round when adaptive); even when antithetic.
            Cost: ``K * (n - 1)`` evaluations per game, plus 2.
        antithetic: pair each order with its reverse (the pair is one sample unit).
        seeds: one int for all games or one per game.
        tolerance: adaptive mode: draw rounds of ``permutations`` orders until every player's
            standard error is ``<= tolerance`` (times ``max |phi|`` when ``relative``), or until
            ``max_permutations`` orders are used; ``stopped_by`` says which.
        batch_size: coalitions per value-function call (memory vs speed).
        device: where masks are built; defaults to the game's ``device`` attribute or CPU.
        keep_units: keep every sample unit's marginal contributions (``units``, for
            :meth:`ShapleyResult.interval`); costs ``K * n * 8`` bytes per game on the CPU.
    """
    game = _check_game(game, n_players)
    _check_sampling(permutations, antithetic, tolerance, max_permutations, batch_size)
    device = torch.device(device or getattr(game, "device", "cpu"))
    B, n = game.n_games, game.n_players
    seed_list = _check_seeds(seeds, B)
    generators = [torch.Generator().manual_seed(s) for s in seed_list]
    v_empty, v_full = _endpoints(game, device, batch_size)
    accs = [_Accumulator(n, device, keep_units) for _ in range(B)]
    used = [0] * B
    stopped = ["fixed" if tolerance is None else ""] * B
    active = list(range(B))
    fast = getattr(game, "prefix_values", None)
    while active:
        orders = [draw_orders(generators[b], permutations, n, antithetic) for b in active]
        if fast is not None:
            idx = torch.tensor(active)
            prefix = fast(active, [o.to(device) for o in orders], v_empty[idx], v_full[idx])
        else:
            prefix = _prefix_values_generic(game, orders, active, v_empty, v_full, batch_size,
                                            device)
        for b, o, values in zip(active, orders, prefix, strict=True):
            contrib = marginal_contributions(o, values)
            if antithetic:
                contrib = contrib.view(-1, 2, n).mean(1)
            accs[b].add(contrib)
            used[b] += permutations
        if tolerance is None:
            break
        still = []
        for b in active:
            se = accs[b].stderr()
            bound = tolerance * (accs[b].mean().abs().max() if relative else 1.0)
            if bool((se <= bound).all()):
                stopped[b] = "tolerance"
            elif used[b] + permutations > max_permutations:
                stopped[b] = "max_permutations"
            else:
                still.append(b)
        active = still
    phi = torch.stack([a.mean() for a in accs])
    return ShapleyResult(
        phi=phi,
        stderr=torch.stack([a.stderr() for a in accs]),
        v_empty=v_empty,
        v_full=v_full,
        permutations=torch.tensor(used),
        evaluations=torch.tensor([2 + k * (n - 1) for k in used]),
        stopped_by=stopped,
        units=[torch.cat(a.units) for a in accs] if keep_units else None,
    )


def exact_shapley(
    game: Game | Callable[..., torch.Tensor],
    *,
    n_players: int | None = None,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
) -> ShapleyResult:
    """Exact Shapley values by enumerating all ``2^n`` coalitions (``n <= 16``), in float64."""
    game = _check_game(game, n_players)
    B, n = game.n_games, game.n_players
    if n > MAX_EXACT_PLAYERS:
        raise ShapCAMError(f"exact enumeration takes 2^n coalitions; n={n} > "
                           f"{MAX_EXACT_PLAYERS}. Group players (block=...) or sample orders")
    device = torch.device(device or getattr(game, "device", "cpu"))
    codes = torch.arange(2**n, device=device)
    bits = (codes.unsqueeze(1) >> torch.arange(n, device=device)) & 1  # (2^n, n)
    masks = bits.bool()
    index = torch.arange(B, device=device).repeat_interleave(2**n)
    values = _evaluate(game, index, masks.repeat(B, 1), batch_size).view(B, 2**n)
    size = bits.sum(1)
    # w(s) = s! (n - s - 1)! / n!, computed with lgamma for stability.
    s = size.to(torch.float64)
    weight = torch.exp(torch.lgamma(s + 1) + torch.lgamma(n - s) - math.lgamma(n + 1))
    phi = torch.zeros(B, n, dtype=torch.float64, device=device)
    for i in range(n):
        without = bits[:, i] == 0
        S = codes[without]
        phi[:, i] = ((values[:, S | (1 << i)] - values[:, S]) * weight[without]).sum(1)
    return ShapleyResult(
        phi=phi,
        stderr=torch.zeros_like(phi),
        v_empty=values[:, 0],
        v_full=values[:, -1],
        permutations=torch.full((B,), -1),
        evaluations=torch.full((B,), 2**n),
        stopped_by=["exact"] * B,
    )


def block_groups(height: int, width: int, block: int | tuple[int, int]) -> torch.Tensor:
    """Assign each position of an ``height x width`` grid to a ``block`` tile: ``(h * w,)`` long.

    Tiles are numbered row-major; edge tiles are smaller when the block does not divide the grid.
    E.g. ``block_groups(14, 14, 2)`` gives 49 players of 4 positions each.
    """
    bh, bw = (block, block) if isinstance(block, int) else block
    if bh < 1 or bw < 1:
        raise ShapCAMError(f"block must be >= 1, got {block}")
    rows = torch.arange(height) // bh
    cols = torch.arange(width) // bw
    n_cols = math.ceil(width / bw)
    return (rows.view(-1, 1) * n_cols + cols.view(1, -1)).reshape(-1)
