"""FLTrust (`strategies/fltrust.py`, `flip_fl.defenses.fltrust`): trust = ReLU(cos(update, server update)), the
numpy rule by hand, the strategy on a hand-made round, and the server's root data (held out of evaluation,
training the server update)."""

from __future__ import annotations

import numpy as np
import pytest

from flip_fl.config import ConfigError
from flip_fl.data import load_datasets
from flip_fl.defenses.fltrust import fltrust, root_split
from flip_fl.defenses.updates import bn_statistic_mask
from flip_fl.models import build_model
from strategies import build_strategy, evaluation_set
from tests.defenses.rounds import (
    BAD,
    P,
    aggregate,
    assert_update,
    flat,
    make_global,
    make_updates,
    strategy,
    with_statistics,
)
from tests.tiny import tiny_config

# --------------------------------------------------------------------------- numpy rule


def test_fltrust_zero_weight_for_opposite_update():
    g0 = np.array([1.0, 2.0, 0.0, -1.0])
    U = np.array([[2.0, 4.1, 0.1, -2.0], [0.5, 1.0, 0.3, -0.2], -10 * g0, [1.0, 0.0, 0.0, 0.0]])
    out = fltrust(U, g0)
    assert out.weights[2] == 0.0 and not out.kept[2]
    gn = np.linalg.norm(g0)
    ts = [max(0.0, (u @ g0) / (np.linalg.norm(u) * gn)) for u in U]
    ref = sum(ts[i] * gn / np.linalg.norm(U[i]) * U[i] for i in range(4)) / sum(ts)
    np.testing.assert_allclose(out.arrays["scores"], ts)
    np.testing.assert_allclose(out.delta, ref)
    # every kept update is rescaled to ||g0||
    for i in range(4):
        assert np.linalg.norm(out.arrays["scale"][i] * U[i]) == pytest.approx(gn)


def test_fltrust_all_distrusted_is_zero():
    g0 = np.array([1.0, 0.0])
    U = np.array([[-1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    out = fltrust(U, g0)
    assert np.all(out.delta == 0) and not out.kept.any() and np.all(out.weights == 0)


# --------------------------------------------------------------------------- strategy


def test_fltrust_trusts_by_cosine_to_the_server_update(offline):
    g, ups = make_global(), make_updates()
    g0 = flat({k: np.asarray(v, float) for k, v in make_updates(outlier=1.0)[0].items()})[P]
    strat = offline(strategy("fltrust", "defense.fltrust.root_size=20"), g0)
    new, U, extra = aggregate(strat, g, ups)
    norms = np.linalg.norm(U[:, P], axis=1)
    trust = np.maximum(U[:, P] @ g0 / (norms * np.linalg.norm(g0)), 0)
    expected = (trust * np.linalg.norm(g0) / norms) @ U[:, P] / trust.sum()
    assert_update(new, g, with_statistics(U, expected, trust / trust.sum()), atol=1e-5)
    assert extra["defense_rejected"] == [BAD] and extra["detection_recall"] == 1.0


def test_fltrust_root_data_is_held_out_of_evaluation_and_trains_the_server_update():
    cfg = tiny_config("defense.name=fltrust", "defense.fltrust.root_size=40")
    root, rest = root_split(cfg.seed, 40, 300)
    assert len(root) == 40 and len(rest) == 260 and not set(root) & set(rest)
    np.testing.assert_array_equal(root, root_split(cfg.seed, 40, 300)[0])
    test = load_datasets(cfg)[1]
    assert len(evaluation_set(cfg, test)) == 260 and len(evaluation_set(tiny_config(), test)) == 300
    strat = build_strategy(cfg, {10 + i: i for i in range(6)}, {})
    np.testing.assert_array_equal(type(strat).held_out(cfg.defense.params["fltrust"], cfg, 300), root)
    strat.global_state = {k: v.numpy() for k, v in build_model(cfg.model, test).state_dict().items()}
    g0 = strat.server_update(1)
    trained_parameters = int((~bn_statistic_mask(strat.global_state)).sum())
    assert g0.shape == (trained_parameters,) and np.isfinite(g0).all() and np.linalg.norm(g0) > 0
    np.testing.assert_array_equal(g0, strat.server_update(1))


def test_root_split_refuses_a_root_as_large_as_the_test_set():
    with pytest.raises(ValueError, match="300 root images cannot be held out of a test set of 300"):
        root_split(0, 300, 300)


def test_impossible_fltrust_settings_are_config_errors():
    with pytest.raises(ConfigError, match="defense.fltrust.root_size: 300 server images"):
        tiny_config("federation.num_clients=8", "federation.clients_per_round=7", "attack.num_malicious=1",
                    "defense.name=fltrust", "defense.fltrust.root_size=300")
