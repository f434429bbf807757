"""Centered clipping (`strategies/centered_clip.py`, `flip_fl.defenses.centered_clip.centered_clip`): the paper's
iteration on a 3-client example by hand and against a loop reference, the bound on an outlier's pull, and the
strategy's history across rounds and checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flip_fl.config import ConfigError
from flip_fl.defenses.centered_clip import centered_clip
from tests.defenses.references import planted
from tests.defenses.rounds import (
    BAD,
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


def ref_centered_clip(X, v0, tau, iterations):
    """The authors' loop: v = v + sum_i clip(x_i - v) / n, clip(z) = z * min(1, tau / ||z||)."""
    v = np.array(v0, dtype=float)
    for _ in range(iterations):
        total = np.zeros_like(v)
        for x in X:
            z = np.asarray(x, dtype=float) - v
            norm = math.sqrt(sum(float(e) ** 2 for e in z))
            total += z * min(1.0, tau / norm) if norm > 0 else z
        v = v + total / len(X)
    return v


X3 = np.array([[1.0, 0.0], [0.0, 1.0], [10.0, 0.0]])


def test_three_clients_one_iteration_by_hand():
    """From v0 = 0 with tau = 2: distances 1, 1, 10, so x3 is clipped to (2, 0); v1 = ((1,0) + (0,1) + (2,0)) / 3."""
    out = centered_clip(X3, None, tau=2.0, iterations=1)
    np.testing.assert_allclose(out.delta, [1.0, 1.0 / 3.0])
    np.testing.assert_allclose(out.weights, [1 / 3, 1 / 3, 0.2 / 3])  # c_i / n, clip factor of x3 = 2 / 10
    assert out.info["history_weight"] == pytest.approx(1 - (1 + 1 + 0.2) / 3)
    assert out.kept.all() and out.info["num_clipped"] == 1


def test_three_clients_two_iterations_by_hand():
    """The second step starts at v1 = (1, 1/3): distances 1/3, sqrt(13)/3, sqrt(730)/3; only x3 is clipped."""
    v1 = np.array([1.0, 1.0 / 3.0])
    c3 = 2.0 / (math.sqrt(730.0) / 3.0)
    v2 = v1 + (np.array([0.0, -1 / 3]) + np.array([-1.0, 2 / 3]) + c3 * np.array([9.0, -1 / 3])) / 3
    out = centered_clip(X3, None, tau=2.0, iterations=2)
    np.testing.assert_allclose(out.delta, v2)
    np.testing.assert_allclose(out.arrays["distances"][:, 1], [1 / 3, math.sqrt(13) / 3, math.sqrt(730) / 3])


@pytest.mark.parametrize("iterations", [1, 3, 7])
@pytest.mark.parametrize("tau", [0.05, 1.0, 100.0])
def test_matches_the_reference_and_its_affine_weights(tau, iterations):
    rng = np.random.default_rng(iterations)
    X = rng.normal(size=(6, 9)) + rng.normal(size=9)
    v0 = rng.normal(size=9)
    out = centered_clip(X, v0, tau, iterations)
    np.testing.assert_allclose(out.delta, ref_centered_clip(X, v0, tau, iterations), atol=1e-12)
    a = out.info["history_weight"]
    np.testing.assert_allclose(out.delta, a * v0 + out.weights @ X, atol=1e-12)
    assert a + out.weights.sum() == pytest.approx(1.0) and np.all(out.weights > 0)


def test_without_clipping_one_step_is_the_mean_whatever_the_start():
    X = np.random.default_rng(0).normal(size=(5, 4))
    out = centered_clip(X, np.full(4, 3.0), tau=1e6, iterations=1)
    np.testing.assert_allclose(out.delta, X.mean(axis=0))
    assert out.info["history_weight"] == pytest.approx(0.0) and out.info["num_clipped"] == 0


def test_an_outliers_pull_is_at_most_tau_over_n():
    """A planted outlier 1000 x away moves the aggregate by at most tau / n from where the clean clients put it."""
    U, honest_mean = planted(n_honest=9, d=30, seed=2)
    tau = 1.0
    out = centered_clip(U, honest_mean, tau, iterations=1)
    clean = centered_clip(U[:-1], honest_mean, tau, iterations=1).delta * 9 / 10 + honest_mean / 10
    assert np.linalg.norm(out.delta - clean) <= tau / 10 + 1e-12
    assert out.weights[-1] < 1e-3 and np.linalg.norm(out.delta - honest_mean) < np.linalg.norm(honest_mean) * 0.1


def test_bad_arguments_are_value_errors():
    X = np.ones((3, 2))
    for previous, tau, iterations, message in [(None, 0.0, 1, "tau"), (None, np.inf, 1, "tau"),
                                               (None, 1.0, 0, "iterations"), (np.ones(3), 1.0, 1, "previous"),
                                               ([np.nan, 0.0], 1.0, 1, "previous")]:
        with pytest.raises(ValueError, match=message):
            centered_clip(X, previous, tau, iterations)


# --------------------------------------------------------------------------- strategy


def test_the_first_round_clips_around_zero_and_the_next_around_it():
    """Round 1 starts at zero; round 2 starts at round 1's aggregate update (of the trained parameters)."""
    g, ups = make_global(), make_updates()
    strat = strategy("centered_clip", "defense.centered_clip.tau=2", "defense.centered_clip.iterations=2")
    new, U, extra = aggregate(strat, g, ups)
    first = centered_clip(U[:, P], None, 2.0, 2)
    assert extra["defense_clients"] == list(range(N)) and "defense_kept" not in extra
    np.testing.assert_allclose(extra["defense_weights"], np.round(first.weights, 6))
    assert extra["defense_weights"][BAD] < min(extra["defense_weights"][:BAD])
    assert_update(new, g, with_statistics(U, first.delta, first.weights / first.weights.sum()))
    np.testing.assert_array_equal(strat.state_dict()["previous_update"], first.delta)
    new2, U2, extra2 = aggregate(strat, g, ups, server_round=2)
    second = centered_clip(U2[:, P], first.delta, 2.0, 2)
    assert_update(new2, g, with_statistics(U2, second.delta, second.weights / second.weights.sum()))
    assert extra2["defense_previous_norm"] == pytest.approx(np.linalg.norm(first.delta))


def test_a_resumed_strategy_continues_the_history_and_refuses_foreign_state():
    g, ups = make_global(), make_updates()
    a = strategy("centered_clip", "defense.centered_clip.tau=1")
    assert a.state_dict() == {}
    aggregate(a, g, ups)
    b = strategy("centered_clip", "defense.centered_clip.tau=1")
    b.load_state_dict(a.state_dict())
    a.state_dict()["previous_update"][0] = 99.0  # a copy, not a view of the live state
    after_a, after_b = (aggregate(s, g, ups, server_round=2)[0] for s in (a, b))
    assert all(np.array_equal(after_a[k], after_b[k]) for k in after_a)
    fresh = aggregate(strategy("centered_clip", "defense.centered_clip.tau=1"), g, ups, server_round=2)[0]
    assert not all(np.array_equal(after_a[k], fresh[k]) for k in after_a)
    with pytest.raises(ValueError, match="unexpected entries"):
        b.load_state_dict({"history/1": np.ones(2)})
    b.load_state_dict({"previous_update": np.ones(3)})
    with pytest.raises(ValueError, match="stored previous aggregate has 3 entries"):
        aggregate(b, g, ups, server_round=3)


@pytest.mark.parametrize("override, message", [
    ("defense.centered_clip.tau=0", "defense.centered_clip.tau: 0.0 is out of range"),
    ("defense.centered_clip.tau=.inf", "defense.centered_clip.tau: inf is not a finite number"),
    ("defense.centered_clip.iterations=0", "defense.centered_clip.iterations: 0 is out of range"),
])
def test_bad_parameters_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("defense.name=centered_clip", override)


def test_distances_are_the_same_in_small_column_chunks(monkeypatch):
    rng = np.random.default_rng(9)
    X, v0 = rng.normal(size=(5, 37)), rng.normal(size=37)
    whole = centered_clip(X, v0, 2.0, 3)
    monkeypatch.setattr("flip_fl.defenses.common.CHUNK_ELEMENTS", 10)  # 2 columns of 5 rows per chunk
    chunked = centered_clip(X, v0, 2.0, 3)
    np.testing.assert_allclose(chunked.delta, whole.delta, rtol=1e-13)
    np.testing.assert_allclose(chunked.arrays["distances"], whole.arrays["distances"], rtol=1e-13)
