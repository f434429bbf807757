"""Krum (`strategies/krum.py`, `flip_fl.defenses.krum.krum`): the numpy rule against brute force and Flower, the
strategy on hand-made rounds, its bound on the replies and its exact float64 selection."""

from __future__ import annotations

import numpy as np
import pytest

from flip_fl.config import ConfigError
from flip_fl.defenses.krum import krum
from strategies.seeded_fedavg import arrays_to_numpy
from tests.defenses.exact_selection import ATTACKERS, NORMS, exact_round
from tests.defenses.references import flower_inputs, flower_legacy, flower_new_style, planted, ref_krum_scores
from tests.defenses.rounds import (
    BAD,
    EXAMPLES,
    NODE,
    P,
    aggregate,
    assert_update,
    make_global,
    make_updates,
    reply,
    start_round,
    strategy,
    trained,
    with_statistics,
)
from tests.tiny import tiny_config

# --------------------------------------------------------------------------- numpy rule


@pytest.mark.parametrize("f", [0, 1, 2])
def test_krum_matches_bruteforce(f):
    rng = np.random.default_rng(10 + f)
    U = rng.standard_normal((9, 6)) * rng.uniform(0.5, 3.0, (9, 1))
    out = krum(U, f)
    scores = ref_krum_scores(U, f)
    np.testing.assert_allclose(out.arrays["scores"], scores, rtol=1e-10)
    best = int(np.argmin(scores))
    np.testing.assert_allclose(out.delta, U[best])
    assert out.kept.tolist() == [i == best for i in range(9)]
    assert out.weights[best] == 1.0 and out.weights.sum() == 1.0


def test_krum_rejects_planted_outlier():
    U, honest_mean = planted()
    out = krum(U, 1, multi_k=1)
    assert not out.kept[-1] and out.weights[-1] == 0.0
    np.testing.assert_allclose(out.delta, honest_mean, atol=0.2)


def test_krum_validation():
    U = np.ones((6, 2))
    with pytest.raises(ValueError, match="num_malicious"):
        krum(U, 2)  # needs n > 2f + 2 = 6
    with pytest.raises(ValueError, match="num_malicious"):
        krum(U, -1)
    with pytest.raises(ValueError, match="multi_k"):
        krum(U, 1, multi_k=7)
    with pytest.raises(ValueError, match="multi_k"):
        krum(U, 1, multi_k=0)
    # strict=False: Flower's rule, max(1, n - f - 2) neighbours and no bound on f
    rng = np.random.default_rng(0)
    V = rng.standard_normal((10, 3))
    loose = krum(V, 4, strict=False)
    assert loose.info["num_neighbors"] == 4
    np.testing.assert_allclose(loose.delta, V[int(np.argmin(ref_krum_scores(V, 4)))])
    beyond = krum(V, 8, strict=False)
    assert beyond.info["num_neighbors"] == 1
    np.testing.assert_allclose(beyond.delta, V[int(np.argmin(ref_krum_scores(V, 8)))])
    assert krum(V[:1], 3, strict=False).kept.tolist() == [True]


@pytest.mark.parametrize("name", ["random", "planted"])
def test_flower_legacy_krum_agrees(name):
    agg = flower_legacy()
    U = flower_inputs()[name]
    res = [([u], 1) for u in U]
    np.testing.assert_allclose(agg.aggregate_krum(res, 2, 0)[0], krum(U, 2).delta)


@pytest.mark.parametrize("name", ["random", "planted"])
def test_flower_new_style_krum_agrees(name):
    from flwr.serverapp.strategy import Krum

    U = flower_inputs()[name]
    np.testing.assert_allclose(flower_new_style(Krum(num_malicious_nodes=2), U), krum(U, 2).delta)


# --------------------------------------------------------------------------- strategy


def test_krum_selects_one_benign_update_like_the_numpy_rule():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("krum"), g, ups)
    ref = krum(U[:, P], num_malicious=1, strict=False)
    assert_update(new, g, with_statistics(U, ref.delta, ref.weights), atol=1e-5)
    assert extra["defense_kept"] == [int(np.flatnonzero(ref.kept)[0])] and BAD in extra["defense_rejected"]
    assert extra["detection_recall"] == 1.0 and extra["detection_tp"] == 1 and extra["detection_fp"] == len(ups) - 2
    assert extra["defense_attacker_weight"] == 0.0


def test_impossible_krum_settings_are_config_errors():
    with pytest.raises(ConfigError, match="defense.krum.num_malicious: f = 7 must be below"):
        tiny_config("federation.num_clients=8", "federation.clients_per_round=7", "attack.num_malicious=1",
                    "defense.name=krum", "defense.krum.num_malicious=7")


def test_a_round_krum_cannot_decide_is_skipped_not_scored():
    """Failures leave 4 valid replies for f = 1 (Krum needs 5): the global model is kept, and no client
    counts as rejected in the detection metrics."""
    strat = strategy("krum", "server.min_clients=1")
    g = make_global()
    start_round(strat, g)
    states = [trained(g, u) for u in make_updates()]
    for i in (0, 1, 2):
        states[i]["fc.weight"][0, 0] = np.inf
    new, _ = strat.aggregate_train(1, [reply(NODE + i, states[i], EXAMPLES[i]) for i in range(len(states))])
    extra = strat.rounds[1].extra
    assert extra["defense_skipped"] is True and "krum with f = 1 needs 2f + 3 = 5" in extra["defense_skip_reason"]
    assert not any(k.startswith("detection_") for k in extra) and "defense_rejected" not in extra
    for k, v in arrays_to_numpy(new).items():
        np.testing.assert_array_equal(v, g[k])


@pytest.mark.parametrize("norm", NORMS)
def test_krum_selection_matches_a_float64_reference_on_a_1m_parameter_model(norm):
    expected, kept, new, models = exact_round("krum", norm)
    assert all(a not in expected["multikrum"] for a in ATTACKERS)  # the data separates them: a real test
    assert kept == expected["krum"], norm
    # the model moves by exactly the selected update (float32 rounding of the sum)
    np.testing.assert_array_equal(new["layer.weight"].numpy(), models[expected["krum"][0]]["layer.weight"])
