"""Coordinate-wise trimmed mean (`strategies/trimmed_mean.py`, `flip_fl.defenses.trimmed_mean.trimmed_mean`): the
numpy rule against a loop and Flower, and the strategy on a hand-made round."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from flip_fl.defenses.trimmed_mean import trimmed_mean
from tests.defenses.references import flower_inputs, flower_legacy, flower_new_style, planted, ref_sorted_column
from tests.defenses.rounds import BAD, P, aggregate, assert_update, make_global, make_updates, strategy, with_statistics

# --------------------------------------------------------------------------- numpy rule


def test_trimmed_mean_ignores_planted_outlier():
    U, honest_mean = planted()
    tm = trimmed_mean(U, 0.125)  # trims 1 per side of 8
    assert tm.weights[-1] == 0.0 and tm.info["num_trimmed_per_side"] == 1
    np.testing.assert_allclose(tm.delta, honest_mean, atol=0.1)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.3, 0.45])
def test_trimmed_mean_matches_loop(beta):
    rng = np.random.default_rng(7)
    n = 10
    U = rng.standard_normal((n, 6))
    k = int(beta * n)
    ref = [sum(ref_sorted_column(U, j)[k : n - k]) / (n - 2 * k) for j in range(6)]
    out = trimmed_mean(U, beta)
    np.testing.assert_allclose(out.delta, ref)
    assert math.isclose(out.weights.sum(), 1.0)


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7])
def test_trimmed_mean_validation(beta):
    with pytest.raises(ValueError, match=r"beta .*\[0, 0.5\)"):
        trimmed_mean(np.ones((4, 2)), beta)


@pytest.mark.parametrize("name", ["random", "planted"])
def test_flower_legacy_trimmed_mean_agrees(name):
    agg = flower_legacy()
    U = flower_inputs()[name]
    res = [([u], 1) for u in U]
    np.testing.assert_allclose(agg.aggregate_trimmed_avg(res, 0.2)[0], trimmed_mean(U, 0.2).delta)


@pytest.mark.parametrize("name", ["random", "planted"])
def test_flower_new_style_fedtrimmedavg_agrees(name):
    from flwr.serverapp.strategy import FedTrimmedAvg

    U = flower_inputs()[name]
    np.testing.assert_allclose(flower_new_style(FedTrimmedAvg(beta=0.2), U), trimmed_mean(U, 0.2).delta)


# --------------------------------------------------------------------------- strategy


def test_trimmed_mean_matches_scipy_and_trims_the_outlier():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("trimmed_mean", "defense.trimmed_mean.beta=0.2"), g, ups)
    # the trimmed mean of the trained parameters; BatchNorm statistics: the mean with each client's surviving share
    shares = trimmed_mean(U[:, P], 0.2).weights
    assert_update(new, g, with_statistics(U, stats.trim_mean(U[:, P], 0.2, axis=0), shares), atol=1e-5)
    np.testing.assert_allclose(extra["defense_weights"], shares, atol=1e-6)
    assert extra["defense_weights"][BAD] == 0.0 and extra["defense_num_trimmed_per_side"] == 1
