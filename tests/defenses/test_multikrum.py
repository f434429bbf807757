"""Multi-Krum (`strategies/multikrum.py`, `flip_fl.defenses.krum.krum(multi_k=m)`): the numpy rule against brute
force and Flower, the strategy on a hand-made round, its config checks and its exact float64 selection."""

from __future__ import annotations

import numpy as np
import pytest

from flip_fl.config import ConfigError
from flip_fl.defenses.krum import krum
from tests.defenses.exact_selection import ATTACKERS, NORMS, exact_round
from tests.defenses.references import flower_inputs, flower_legacy, flower_new_style, planted, ref_krum_scores
from tests.defenses.rounds import (
    BAD,
    EXAMPLES,
    N,
    P,
    aggregate,
    assert_update,
    make_global,
    make_updates,
    strategy,
    with_statistics,
)
from tests.tiny import tiny_config

# --------------------------------------------------------------------------- numpy rule


def test_multikrum_matches_bruteforce():
    rng = np.random.default_rng(3)
    U = rng.standard_normal((10, 5))
    scores = ref_krum_scores(U, 2)
    chosen = sorted(range(10), key=lambda i: scores[i])[:4]
    out = krum(U, 2, multi_k=4)
    np.testing.assert_allclose(out.delta, U[chosen].mean(axis=0))
    assert set(np.flatnonzero(out.kept)) == set(chosen)
    w = np.arange(1.0, 11.0)
    outw = krum(U, 2, multi_k=4, weights=w)
    np.testing.assert_allclose(outw.delta, (w[chosen, None] * U[chosen]).sum(0) / w[chosen].sum())


def test_multikrum_rejects_planted_outlier():
    U, honest_mean = planted()
    out = krum(U, 1, multi_k=5)
    assert not out.kept[-1] and out.weights[-1] == 0.0
    np.testing.assert_allclose(out.delta, honest_mean, atol=0.2)


@pytest.mark.parametrize("name", ["random", "planted"])
def test_flower_legacy_multikrum_agrees(name):
    agg = flower_legacy()
    U = flower_inputs()[name]
    res = [([u], 1) for u in U]
    np.testing.assert_allclose(agg.aggregate_krum(res, 2, 4)[0], krum(U, 2, multi_k=4).delta)


@pytest.mark.parametrize("name", ["random", "planted"])
def test_flower_new_style_multikrum_agrees(name):
    from flwr.serverapp.strategy import MultiKrum

    U = flower_inputs()[name]
    ne = np.arange(1, 12)
    # MultiKrum averages the selected updates weighted by "num-examples".
    mk = flower_new_style(MultiKrum(num_malicious_nodes=2, num_nodes_to_select=4), U, ne)
    np.testing.assert_allclose(mk, krum(U, 2, multi_k=4, weights=ne).delta)


# --------------------------------------------------------------------------- strategy


def test_multikrum_averages_the_n_minus_f_best_weighted_by_examples():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("multikrum"), g, ups)
    ref = krum(U[:, P], num_malicious=1, multi_k=N - 1, weights=EXAMPLES, strict=False)
    assert_update(new, g, with_statistics(U, ref.delta, ref.weights), atol=1e-5)
    assert extra["defense_rejected"] == [BAD] and extra["detection_precision"] == 1.0
    np.testing.assert_allclose(extra["defense_weights"], ref.weights, atol=1e-6)


def test_multikrum_num_selected_is_m():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("multikrum", "defense.multikrum.num_selected=3"), g, ups)
    ref = krum(U[:, P], num_malicious=1, multi_k=3, weights=EXAMPLES, strict=False)
    assert_update(new, g, with_statistics(U, ref.delta, ref.weights), atol=1e-5)
    assert len(extra["defense_kept"]) == 3 and BAD in extra["defense_rejected"]


def test_impossible_multikrum_settings_are_config_errors():
    with pytest.raises(ConfigError, match="defense.multikrum.num_selected: 9 exceeds"):
        tiny_config("federation.num_clients=8", "federation.clients_per_round=7", "attack.num_malicious=1",
                    "defense.name=multikrum", "defense.multikrum.num_selected=9")


@pytest.mark.parametrize("norm", NORMS)
def test_multikrum_selection_matches_a_float64_reference_on_a_1m_parameter_model(norm):
    expected, kept, _, _ = exact_round("multikrum", norm)
    assert all(a not in expected["multikrum"] for a in ATTACKERS)  # the data separates them: a real test
    assert kept == expected["multikrum"], norm
