"""FedAvg (`strategies/fedavg.py`): no defense, Flower's example-weighted mean, and its reference `mean`."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.fedavg import FedAvgDefense
from tests.defenses.rounds import aggregate, assert_update, example_weights, make_global, make_updates, strategy
from tests.reference_rules import mean


def test_mean_weighted_matches_loop():
    rng = np.random.default_rng(1)
    U = rng.standard_normal((5, 4))
    w = np.array([1.0, 2.0, 3.0, 0.0, 4.0])
    out = mean(U, w)
    ref = sum(w[i] * U[i] for i in range(5)) / w.sum()
    np.testing.assert_allclose(out.delta, ref)
    np.testing.assert_allclose(out.weights, w / w.sum())
    assert out.kept.all()
    np.testing.assert_allclose(mean(U).delta, U.mean(axis=0))


def test_fedavg_is_the_example_weighted_mean_with_server_lr():
    g, ups = make_global(), make_updates()
    strat = strategy("fedavg", "server.lr=0.5")
    assert type(strat) is FedAvgDefense
    new, U, extra = aggregate(strat, g, ups)
    assert_update(new, g, 0.5 * example_weights() @ U, atol=1e-5)
    assert extra["aggregation_seconds"] >= 0 and "defense_weights" not in extra


def test_fedavg_unweighted_is_the_plain_mean():
    g, ups = make_global(), make_updates()
    new, U, _ = aggregate(strategy("fedavg", "server.weighted=false"), g, ups)
    assert_update(new, g, U.mean(axis=0), atol=1e-5)


def test_fedavg_keeps_no_state():
    with pytest.raises(ValueError, match="keeps no state"):
        strategy("fedavg").load_state_dict({"history/1": np.ones(2)})
    assert strategy("fedavg").state_dict() == {}
