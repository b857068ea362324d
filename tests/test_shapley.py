"""Shapley estimators on small games with known answers."""

from __future__ import annotations

import math
from itertools import permutations as all_orders

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shapcam.errors import ShapCAMError
from shapcam.methods.shapley import (
    FunctionGame,
    block_groups,
    exact_shapley,
    permutation_shapley,
    prefix_masks,
)


def table_game(table: torch.Tensor, n: int):
    """v(S) = table[code(S)], code = sum of 2^i over players i in S."""
    powers = 1 << torch.arange(n)

    def v(masks: torch.Tensor) -> torch.Tensor:
        return table[(masks.long() * powers).sum(1)]

    return v


def brute_force_shapley(table: torch.Tensor, n: int) -> torch.Tensor:
    """Average of marginal contributions over all n! orders (the definition)."""
    phi = torch.zeros(n, dtype=torch.float64)
    orders = list(all_orders(range(n)))
    for order in orders:
        code = 0
        for p in order:
            phi[p] += table[code | (1 << p)] - table[code]
            code |= 1 << p
    return phi / len(orders)


games = st.integers(min_value=1, max_value=7).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(
        st.floats(-10, 10, allow_nan=False), min_size=2**n, max_size=2**n)))

ESTIMATORS = {
    "plain": dict(permutations=6),
    "antithetic": dict(permutations=6, antithetic=True),
    "adaptive": dict(permutations=2, tolerance=1e-3, max_permutations=8),
}


@settings(max_examples=60, deadline=None)
@given(games, st.integers(0, 2**31 - 1))
def test_efficiency_holds_for_every_estimator_on_every_sample(game, seed):
    n, values = game
    table = torch.tensor(values, dtype=torch.float64)
    v = table_game(table, n)
    total = table[-1] - table[0]
    exact = exact_shapley(v, n_players=n)
    torch.testing.assert_close(exact.phi.sum(1), total.view(1), atol=1e-9, rtol=0)
    for kwargs in ESTIMATORS.values():
        res = permutation_shapley(v, n_players=n, seeds=seed, **kwargs)
        torch.testing.assert_close(res.phi.sum(1), total.view(1), atol=1e-9, rtol=0)


@settings(max_examples=40, deadline=None)
@given(games)
def test_exact_matches_the_definition_over_all_orders(game):
    n, values = game
    if n > 6:
        return
    table = torch.tensor(values, dtype=torch.float64)
    phi = exact_shapley(table_game(table, n), n_players=n).phi[0]
    torch.testing.assert_close(phi, brute_force_shapley(table, n), atol=1e-9, rtol=0)


@settings(max_examples=40, deadline=None)
@given(games, st.data())
def test_exact_symmetry_null_player_and_linearity(game, data):
    n, values = game
    table = torch.tensor(values, dtype=torch.float64)
    codes = torch.arange(2**n)
    if n >= 2:
        # Symmetry: make players 0 and 1 interchangeable by averaging v over the swap.
        swapped = (codes & ~3) | ((codes & 1) << 1) | ((codes >> 1) & 1)
        sym = (table + table[swapped]) / 2
        phi = exact_shapley(table_game(sym, n), n_players=n).phi[0]
        assert abs(phi[0] - phi[1]) < 1e-9
    # Null player: the last player never changes the value.
    null = table[codes & ~(1 << (n - 1))]
    phi = exact_shapley(table_game(null, n), n_players=n).phi[0]
    assert abs(phi[n - 1]) < 1e-9
    # Linearity: phi(a v + b w) = a phi(v) + b phi(w).
    other = torch.tensor(data.draw(st.lists(st.floats(-5, 5, allow_nan=False),
                                            min_size=2**n, max_size=2**n)), dtype=torch.float64)
    a, b = 2.5, -0.75
    lhs = exact_shapley(table_game(a * table + b * other, n), n_players=n).phi
    rhs = (a * exact_shapley(table_game(table, n), n_players=n).phi
           + b * exact_shapley(table_game(other, n), n_players=n).phi)
    torch.testing.assert_close(lhs, rhs, atol=1e-8, rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**31 - 1), st.data())
def test_every_estimator_is_exact_on_additive_games(n, seed, data):
    weights = torch.tensor(data.draw(st.lists(st.floats(-3, 3, allow_nan=False),
                                              min_size=n, max_size=n)), dtype=torch.float64)
    const = 1.25

    def v(masks):
        return const + masks.double() @ weights

    for kwargs in [*ESTIMATORS.values(), None]:
        if kwargs is None:
            res = exact_shapley(v, n_players=n)
        else:
            res = permutation_shapley(v, n_players=n, seeds=seed, **kwargs)
        torch.testing.assert_close(res.phi[0], weights, atol=1e-9, rtol=0)


def random_game(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(2**n, generator=g, dtype=torch.float64) * 4
    # Add interactions so that sampling error is not trivial.
    return table, table_game(table, n)


@pytest.mark.parametrize("antithetic", [False, True])
def test_sampling_error_shrinks_like_one_over_sqrt_k(antithetic):
    n = 6
    table, v = random_game(n, seed=3)
    exact = exact_shapley(v, n_players=n).phi[0]
    rmse = {}
    for K in (16, 256):
        errs = [permutation_shapley(v, K, n_players=n, seeds=s, antithetic=antithetic).phi[0]
                - exact for s in range(40)]
        rmse[K] = torch.stack(errs).pow(2).mean().sqrt().item()
    ratio = rmse[16] / rmse[256]  # 1/sqrt(K) predicts 4
    assert 2.5 < ratio < 6.5, rmse


def test_standard_error_is_calibrated():
    n = 6
    _, v = random_game(n, seed=5)
    exact = exact_shapley(v, n_players=n).phi[0]
    runs = [permutation_shapley(v, 64, n_players=n, seeds=s) for s in range(60)]
    rmse = torch.stack([r.phi[0] - exact for r in runs]).pow(2).mean(0).sqrt()
    mean_se = torch.stack([r.stderr[0] for r in runs]).mean(0)
    assert ((mean_se / rmse) > 0.6).all() and ((mean_se / rmse) < 1.6).all(), (mean_se, rmse)


def test_results_do_not_depend_on_batch_composition():
    n = 5
    tables = torch.rand(3, 2**n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    powers = 1 << torch.arange(n)

    def v(index, masks):
        return tables[index, (masks.long() * powers).sum(1)]

    batch = permutation_shapley(FunctionGame(v, n, 3, indexed=True), 10, seeds=[7, 8, 9],
                                batch_size=13)
    for b, seed in enumerate([7, 8, 9]):
        alone = permutation_shapley(table_game(tables[b], n), 10, n_players=n, seeds=seed,
                                    batch_size=1000)
        torch.testing.assert_close(batch.phi[b], alone.phi[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(batch.stderr[b], alone.stderr[0], atol=1e-12, rtol=0)


def test_endpoints_are_evaluated_once_per_game():
    n, K = 6, 10
    _, v = random_game(n)
    seen = []

    def counting(masks):
        seen.append(masks.clone())
        return v(masks)

    res = permutation_shapley(counting, K, n_players=n, batch_size=7)
    masks = torch.cat(seen)
    assert masks.shape[0] == 2 + K * (n - 1) == int(res.evaluations[0])
    assert int((masks.sum(1) == 0).sum()) == 1
    assert int((masks.sum(1) == n).sum()) == 1


def test_antithetic_orders_come_in_reversed_pairs():
    from shapcam.methods.shapley import draw_orders

    orders = draw_orders(torch.Generator().manual_seed(0), 8, 10, antithetic=True)
    assert torch.equal(orders[1::2], orders[0::2].flip(1))
    assert all(sorted(o.tolist()) == list(range(10)) for o in orders)


def test_prefix_masks_hold_the_first_t_players():
    orders = torch.tensor([[2, 0, 1]])
    m = prefix_masks(orders)
    assert m.tolist() == [[[False, False, True], [True, False, True]]]


def test_adaptive_mode_stops_on_tolerance_or_cap():
    n = 6
    _, v = random_game(n, seed=2)
    res = permutation_shapley(v, 16, n_players=n, tolerance=0.02, max_permutations=100_000)
    assert res.stopped_by == ["tolerance"] and (res.stderr <= 0.02).all()
    assert int(res.permutations[0]) % 16 == 0 and int(res.permutations[0]) > 16
    capped = permutation_shapley(v, 16, n_players=n, tolerance=1e-9, max_permutations=64)
    assert capped.stopped_by == ["max_permutations"] and int(capped.permutations[0]) == 64
    # The first round equals a fixed-K run with the same seed (same generator stream).
    fixed = permutation_shapley(v, 64, n_players=n)
    torch.testing.assert_close(capped.phi, fixed.phi, atol=1e-12, rtol=0)


def test_relative_tolerance():
    n = 5
    _, v = random_game(n, seed=4)
    res = permutation_shapley(v, 8, n_players=n, tolerance=0.05, relative=True,
                              max_permutations=100_000)
    assert res.stopped_by == ["tolerance"]
    assert (res.stderr <= 0.05 * res.phi.abs().max()).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(permutations=0), "permutations must be an integer >= 1"),
    (dict(permutations=3, antithetic=True), "even number"),
    (dict(permutations=4, tolerance=-1.0), "tolerance > 0"),
    (dict(permutations=4, seeds=[1, 2]), "seeds for 1 games"),
])
def test_bad_estimator_arguments(kwargs, message):
    _, v = random_game(3)
    with pytest.raises(ShapCAMError, match=message):
        permutation_shapley(v, n_players=3, **kwargs)


def test_exact_refuses_too_many_players():
    with pytest.raises(ShapCAMError, match="n=17 > 16"):
        exact_shapley(lambda m: m.sum(1).double(), n_players=17)


def test_plain_function_needs_n_players():
    with pytest.raises(ShapCAMError, match="n_players"):
        permutation_shapley(lambda m: m.sum(1), 4)


def test_block_groups_tile_the_grid():
    g = block_groups(14, 14, 2)
    assert g.shape == (196,) and int(g.max()) == 48
    assert torch.bincount(g).tolist() == [4] * 49
    g = block_groups(7, 7, 2)  # edge tiles are smaller
    counts = torch.bincount(g)
    assert len(counts) == 16 and counts.sum() == 49 and counts.min() == 1
    assert g.view(7, 7)[0, :2].tolist() == [0, 0] and g.view(7, 7)[6, 6] == 15
    assert math.isclose(float(counts.float().mean()), 49 / 16)


def _heavy_tailed_game(n: int = 16):
    """A smooth additive part plus one player that adds 1 only when it completes the grand
    coalition: its marginal contributions are 1 in 1/n of the orders and ~0 otherwise (excess
    kurtosis ~n), the shape of a saliency game's rare decisive position."""
    w = torch.linspace(0.1, 1, n, dtype=torch.float64)

    def v(masks: torch.Tensor) -> torch.Tensor:
        m = masks.to(torch.float64)
        decisive = (m.sum(1) >= n) & masks[:, 0]
        return 0.2 * (m @ w) / w.sum() + decisive.to(torch.float64) \
            + 0.5 * torch.sigmoid(8 * (m @ w - 3))
    return v


def test_bootstrap_t_interval_covers_a_heavy_tailed_player_where_the_gaussian_one_does_not():
    """Over 200 seeds of K = 64 orders: the decisive player's Gaussian 95% interval
    ``phi +- 1.96 se`` covers the exact value in 93% of runs (the heavy tail), the bootstrap-t
    interval in >= 95%."""
    from shapcam.methods.intervals import bootstrap_t_interval

    n, K, runs = 16, 64, 200
    v = _heavy_tailed_game(n)
    exact = exact_shapley(v, n_players=n).phi[0]
    gaussian = boot = 0
    for seed in range(runs):
        r = permutation_shapley(v, K, n_players=n, seeds=seed, keep_units=True)
        assert r.units[0].shape == (K, n)
        torch.testing.assert_close(r.units[0].mean(0), r.phi[0])
        gaussian += bool((r.phi[0, 0] - exact[0]).abs() <= 1.96 * r.stderr[0, 0])
        lo, hi = bootstrap_t_interval(r.units[0], 0.95, resamples=400, seed=seed)
        boot += bool(lo[0] <= exact[0] <= hi[0])
    # measured: 0.93 and 0.985 (deterministic seeds)
    assert gaussian / runs < 0.95  # below its nominal level: the defect the interval is for
    assert boot / runs >= 0.95 and boot - gaussian >= 0.04 * runs


def test_interval_api_and_its_errors():
    v = _heavy_tailed_game(6)
    r = permutation_shapley(v, 32, n_players=6, seeds=1, keep_units=True, antithetic=True)
    assert r.units[0].shape == (16, 6)  # antithetic: a pair is one unit
    lo, hi = r.interval(0.9, resamples=200)
    assert lo.shape == hi.shape == r.phi.shape == (1, 6)
    assert (lo <= r.phi + 1e-12).all() and (r.phi <= hi + 1e-12).all()
    with pytest.raises(ShapCAMError, match="keep_units=True"):
        permutation_shapley(v, 8, n_players=6).interval()
    ex = exact_shapley(v, n_players=6)
    assert ex.interval()[0] is ex.phi
    from shapcam.methods.intervals import bootstrap_t_interval

    with pytest.raises(ShapCAMError, match="K >= 2"):
        bootstrap_t_interval(torch.zeros(1, 3))
