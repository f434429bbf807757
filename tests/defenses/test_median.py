"""Coordinate-wise median (`strategies/median.py`, `flip_fl.defenses.median.coordinate_median`): the numpy rule
against a loop and Flower, and the strategy on a hand-made round."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flip_fl.defenses.median import coordinate_median
from tests.defenses.references import flower_inputs, flower_legacy, flower_new_style, planted, ref_sorted_column
from tests.defenses.rounds import BAD, P, aggregate, assert_update, make_global, make_updates, strategy, with_statistics

# --------------------------------------------------------------------------- numpy rule


@pytest.mark.parametrize("n", [7, 8])
def test_coordinate_median_matches_loop(n):
    rng = np.random.default_rng(n)
    U = rng.standard_normal((n, 9))
    out = coordinate_median(U)
    ref = []
    for j in range(9):
        c = ref_sorted_column(U, j)
        ref.append(c[n // 2] if n % 2 else 0.5 * (c[n // 2 - 1] + c[n // 2]))
    np.testing.assert_allclose(out.delta, ref)
    assert math.isclose(out.weights.sum(), 1.0) and out.kept.all()


def test_median_ignores_planted_outlier():
    U, honest_mean = planted()
    med = coordinate_median(U)
    assert med.weights[-1] == 0.0
    np.testing.assert_allclose(med.delta, honest_mean, atol=0.1)


@pytest.mark.parametrize("name", ["random", "planted"])
def test_flower_legacy_median_agrees(name):
    agg = flower_legacy()
    U = flower_inputs()[name]
    res = [([u], 1) for u in U]
    np.testing.assert_allclose(agg.aggregate_median(res)[0], coordinate_median(U).delta)


@pytest.mark.parametrize("name", ["random", "planted"])
def test_flower_new_style_fedmedian_agrees(name):
    from flwr.serverapp.strategy import FedMedian

    U = flower_inputs()[name]
    np.testing.assert_allclose(flower_new_style(FedMedian(), U), coordinate_median(U).delta)


# --------------------------------------------------------------------------- strategy


def test_median_matches_numpy_and_never_takes_the_outlier():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("median"), g, ups)
    # the median of the trained parameters; BatchNorm statistics: the mean with each client's coordinate share
    shares = coordinate_median(U[:, P]).weights
    assert_update(new, g, with_statistics(U, np.median(U[:, P], axis=0), shares), atol=1e-5)
    np.testing.assert_allclose(extra["defense_weights"], shares, atol=1e-6)
    assert extra["defense_weights"][BAD] == 0.0 and extra["defense_attacker_weight"] == 0.0
    assert sum(extra["defense_weights"]) == pytest.approx(1.0, abs=1e-5)
