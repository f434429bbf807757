"""RFA (`strategies/rfa.py`, `flip_fl.defenses.rfa.geometric_median`): the smoothed-Weiszfeld geometric median
against a hand-written Weiszfeld loop, and the strategy on a hand-made round."""

from __future__ import annotations

import math

import numpy as np

from flip_fl.defenses.rfa import geometric_median
from tests.defenses.references import dist2, planted
from tests.defenses.rounds import (
    BAD,
    EXAMPLES,
    P,
    aggregate,
    assert_update,
    make_global,
    make_updates,
    strategy,
    with_statistics,
)

# --------------------------------------------------------------------------- numpy rule


def test_geometric_median_collinear_is_median_point():
    direction = np.array([1.0, -2.0, 0.5, 3.0])
    ts = [-3.0, -1.0, 0.0, 2.0, 50.0]
    U = np.array([t * direction for t in ts]) + np.array([1.0, 1.0, 1.0, 1.0])
    out = geometric_median(U, iters=2000, tol=0.0, eps=1e-9)
    np.testing.assert_allclose(out.delta, U[2], atol=1e-6)
    np.testing.assert_allclose(out.weights @ U, out.delta)


def test_geometric_median_matches_bruteforce_weiszfeld():
    rng = np.random.default_rng(4)
    U = rng.standard_normal((6, 3))
    a = np.array([1.0, 2.0, 1.0, 3.0, 1.0, 1.0])
    a = a / a.sum()
    z = a @ U
    for _ in range(4):
        b = [a[i] / max(1e-6, math.sqrt(dist2(z, U[i]))) for i in range(6)]
        z = sum(b[i] * U[i] for i in range(6)) / sum(b)
    out = geometric_median(U, weights=a * 7, iters=4, tol=0.0)
    np.testing.assert_allclose(out.delta, z)
    assert out.info["iterations"] == 4 and not out.info["converged"]
    # The converged point minimises the sum of distances.
    conv = geometric_median(U, weights=a, iters=10_000, tol=1e-14)
    assert conv.info["converged"]
    obj = lambda z: sum(a[i] * np.linalg.norm(z - U[i]) for i in range(6))  # noqa: E731
    for _ in range(20):
        assert obj(conv.delta) <= obj(conv.delta + 1e-3 * rng.standard_normal(3)) + 1e-9


def test_geometric_median_robust_to_outlier():
    U, honest_mean = planted()
    out = geometric_median(U)
    np.testing.assert_allclose(out.delta, honest_mean, atol=0.1)
    assert out.weights[-1] < 1e-3


# --------------------------------------------------------------------------- strategy


def test_rfa_is_the_weiszfeld_geometric_median():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("rfa"), g, ups)
    ref = geometric_median(U[:, P], EXAMPLES, iters=100)
    assert_update(new, g, with_statistics(U, ref.delta, ref.weights), atol=1e-5)
    assert extra["defense_weights"][BAD] < 0.05 and extra["defense_converged"] is True


def test_rfa_iters_caps_the_weiszfeld_iterations():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("rfa", "defense.rfa.iters=2"), g, ups)
    ref = geometric_median(U[:, P], EXAMPLES, iters=2)
    assert_update(new, g, with_statistics(U, ref.delta, ref.weights), atol=1e-5)
    assert extra["defense_iterations"] <= 2
