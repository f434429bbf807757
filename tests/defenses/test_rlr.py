"""Robust learning rate (`strategies/rlr.py`, `flip_fl.defenses.rlr.robust_lr`): sign-disputed coordinates get the
step reversed; the numpy rule by hand and by loop, the strategy on a hand-made round, its threshold default."""

from __future__ import annotations

import numpy as np
import pytest

from flip_fl.config import ConfigError
from flip_fl.defenses.rlr import robust_lr
from strategies.rlr import RLRDefense
from tests.defenses.rounds import (
    P,
    aggregate,
    assert_update,
    config,
    example_weights,
    make_global,
    make_updates,
    strategy,
    with_statistics,
)
from tests.tiny import tiny_config

# --------------------------------------------------------------------------- numpy rule


def test_robust_lr_flips_disputed_coordinates():
    U = np.array(
        [
            [1.0, 1.0, -1.0, 2.0],
            [2.0, -1.0, -3.0, 0.0],
            [3.0, 1.0, -2.0, 1.0],
        ]
    )
    out = robust_lr(U, threshold=3)
    mean = U.mean(axis=0)
    # coordinate 0 and 2: unanimous (|sum sign| = 3); 1: 1 of 3; 3: sign(0) = 0 -> 2.
    np.testing.assert_allclose(out.delta, [mean[0], -mean[1], mean[2], -mean[3]])
    assert out.info["num_flipped"] == 2
    out2 = robust_lr(U, threshold=2, server_lr=0.5)
    np.testing.assert_allclose(out2.delta, 0.5 * np.array([mean[0], -mean[1], mean[2], mean[3]]))
    np.testing.assert_allclose(robust_lr(U, 0).delta, mean)
    masked = robust_lr(U, 3, mask=np.array([True, False, True, True]))
    np.testing.assert_allclose(masked.delta, [mean[0], mean[1], mean[2], -mean[3]])


def test_robust_lr_matches_loop_and_validation():
    rng = np.random.default_rng(2)
    U = rng.standard_normal((7, 30))
    w = rng.uniform(1, 5, 7)
    out = robust_lr(U, threshold=4, weights=w)
    wm = (w[:, None] * U).sum(0) / w.sum()
    for j in range(30):
        agree = abs(sum(np.sign(U[i, j]) for i in range(7)))
        assert out.delta[j] == pytest.approx(wm[j] if agree >= 4 else -wm[j])
    with pytest.raises(ValueError, match="threshold"):
        robust_lr(U, threshold=8)


# --------------------------------------------------------------------------- strategy


def test_rlr_flips_coordinates_without_sign_agreement():
    g, ups = make_global(), make_updates()
    strat = strategy("rlr", "defense.rlr.threshold=6")
    new, U, extra = aggregate(strat, g, ups)
    w = example_weights()
    agree = np.abs(np.sign(U[:, P]).sum(axis=0))
    lr = np.where(agree < 6, -1.0, 1.0)
    assert_update(new, g, with_statistics(U, lr * (w @ U[:, P]), w), atol=1e-5)
    assert extra["defense_num_flipped"] == int((lr < 0).sum()) > 0


@pytest.mark.parametrize("overrides, theta", [
    ((), 2.0),  # f + 1, f = the most attackers due in one round (1)
    (("defense.rlr.num_malicious=3",), 4.0),
    (("defense.rlr.threshold=5.5",), 5.5),
])
def test_rlr_threshold_defaults_to_f_plus_one(overrides, theta):
    cfg = config("rlr", *overrides)
    assert RLRDefense.options(cfg.defense.params.get("rlr", RLRDefense.Params()), cfg) == {"threshold": theta}
    assert strategy("rlr", *overrides).threshold == theta


def test_impossible_rlr_settings_are_config_errors():
    with pytest.raises(ConfigError, match="defense.rlr.threshold: 8 exceeds"):
        tiny_config("federation.num_clients=8", "federation.clients_per_round=7", "defense.name=rlr",
                    "defense.rlr.threshold=8")
