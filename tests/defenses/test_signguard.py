"""SignGuard (`strategies/signguard.py`, `flip_fl.defenses.signguard.signguard`): the norm filter, sign features and
median-norm clipping on 3-client examples by hand, MeanShift's largest cluster against scikit-learn called directly,
seeded coordinates, and the strategy's decision."""

from __future__ import annotations

import numpy as np
import pytest

from flip_fl.config import ConfigError
from flip_fl.defenses.signguard import largest_cluster, norm_filter, sign_features, signguard
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

ALL = 1.0  # coordinate_fraction: count the signs of every coordinate


def run(U, lower=0.1, upper=3.0, fraction=ALL, seed=0):
    return signguard(np.asarray(U, dtype=float), lower, upper, fraction, np.random.default_rng(seed))


# --------------------------------------------------------------------------- numpy rule, by hand


def test_three_clients_norm_filter_by_hand():
    """Norms 3, 3, 30: median 3, band (0.3, 9); client 3 is out. Signs: clients 1 and 2 all positive, 3 mixed.
    The kept updates have norm 3 = the median (no clipping): the mean of (1,2,2) and (2,1,2)."""
    out = run([[1, 2, 2], [2, 1, 2], [-20, -20, 10]])
    assert out.arrays["norm_kept"].tolist() == [True, True, False]
    assert out.kept.tolist() == [True, True, False] and out.info["clip_norm"] == 3.0
    np.testing.assert_allclose(out.delta, [1.5, 1.5, 2.0])
    np.testing.assert_allclose(out.weights, [0.5, 0.5, 0.0])


def test_three_clients_sign_filter_by_hand():
    """Equal norms (all pass the norm filter) but client 3's signs are all negative: features (1,0,0), (1,0,0),
    (0,0,1); the group of 2 identical features is the largest cluster."""
    out = run([[1, 2, 2], [2, 1, 2], [-2, -1, -2]])
    assert out.arrays["norm_kept"].all()
    np.testing.assert_allclose(out.arrays["features"], [[1, 0, 0], [1, 0, 0], [0, 0, 1]], atol=1e-7)
    assert out.kept.tolist() == [True, True, False] and out.info["sign_cluster_size"] == 2
    np.testing.assert_allclose(out.delta, [1.5, 1.5, 2.0])


def test_three_clients_median_norm_clipping_by_hand():
    """Norms 3, 6, 1.5 (median 3, all inside (0.3, 9)); same signs. Client 2 is scaled by 3/6 to (1,2,2):
    the aggregate is ((1,2,2) + (1,2,2) + (0.5,1,1)) / 3."""
    out = run([[1, 2, 2], [2, 4, 4], [0.5, 1, 1]])
    assert out.kept.all()
    np.testing.assert_allclose(out.arrays["scale"], [1.0, 0.5, 1.0])
    np.testing.assert_allclose(out.delta, [2.5 / 3, 5 / 3, 5 / 3])


def test_the_norm_band_is_strict():
    """A norm of exactly lower x median or upper x median is rejected, as in the official code."""
    norms = np.array([0.1, 1.0, 1.0, 3.0, 2.9])
    assert norm_filter(norms, 0.1, 3.0).tolist() == [False, True, True, False, True]


def test_sign_features_are_fractions_divided_by_their_maximum():
    S = np.array([[1.0, -1.0, 0.0, 2.0], [0.0, 0.0, -3.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    fractions = np.array([[2 / 4, 1 / 4, 1 / 4], [1 / 4, 2 / 4, 1 / 4], [1.0, 0.0, 0.0]])
    expected = fractions / (fractions.max(axis=0) + 1e-8)
    np.testing.assert_allclose(sign_features(S, np.arange(4)), expected)
    two_columns = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [1.0, 0.0, 0.0]])  # columns 0 and 3 only
    np.testing.assert_allclose(sign_features(S, np.array([0, 3])), two_columns, atol=1e-7)


# --------------------------------------------------------------------------- MeanShift and its fallbacks


def test_the_largest_meanshift_cluster_as_scikit_learn_finds_it():
    """Features of 8 clients near one point and 3 near another: the largest cluster of sklearn's MeanShift with the
    official settings, called here directly."""
    from sklearn.cluster import MeanShift, estimate_bandwidth

    rng = np.random.default_rng(0)
    features = np.vstack([[0.9, 0.0, 0.6] + 0.01 * rng.normal(size=(8, 3)),
                          [0.3, 0.0, 1.0] + 0.01 * rng.normal(size=(3, 3))])
    bandwidth = estimate_bandwidth(features, quantile=0.5, n_samples=50)
    labels = MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=False).fit(features).labels_
    biggest = np.bincount(labels[labels >= 0]).argmax()
    kept, info = largest_cluster(features)
    np.testing.assert_array_equal(kept, labels == biggest)
    assert kept.tolist() == [True] * 8 + [False] * 3 and info["bandwidth"] == pytest.approx(bandwidth)


def test_zero_bandwidth_uses_groups_of_identical_features():
    """With 3 clients the estimated bandwidth is 0: the largest group of identical features is kept; a tie keeps all."""
    kept, info = largest_cluster(np.array([[1.0, 0, 0], [0, 0, 1.0], [1.0, 0, 0]]))
    assert kept.tolist() == [True, False, True] and info["bandwidth"] == 0.0
    kept, _ = largest_cluster(np.array([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]]))
    assert kept.all()
    kept, _ = largest_cluster(np.array([[1.0, 0, 0]]))
    assert kept.all()


def test_a_sign_flipped_client_of_normal_norm_is_clustered_out():
    """10 clients with the same update norm: the one whose signs are flipped passes the norm filter and is removed
    by the sign clustering alone."""
    rng = np.random.default_rng(1)
    direction = rng.choice([-1.0, 1.0], size=400, p=[0.2, 0.8]) * rng.uniform(0.5, 1.0, size=400)  # mostly positive
    U = direction + 0.3 * rng.normal(size=(10, 400))
    U[7] = -U[7]
    out = run(U, fraction=0.25)
    assert out.arrays["norm_kept"].all() and out.kept.tolist() == [i != 7 for i in range(10)]
    assert out.info["num_sign_rejected"] == 1 and out.info["num_coordinates"] == 100


def test_a_planted_outlier_is_removed_and_clean_updates_pass():
    rng = np.random.default_rng(2)
    clean = 1.0 + 0.05 * rng.normal(size=(9, 50))
    out = run(np.vstack([clean, -1000.0 * np.ones(50)]), fraction=0.1)
    assert out.kept.tolist() == [True] * 9 + [False]
    norms = np.linalg.norm(clean, axis=1)
    med = np.median(np.r_[norms, 1000.0 * np.sqrt(50)])
    np.testing.assert_allclose(out.delta, (np.minimum(1.0, med / norms)[:, None] * clean).mean(axis=0))


def test_coordinates_are_seeded_and_at_least_one():
    U = np.random.default_rng(0).normal(size=(6, 40))
    a, b, c = run(U, fraction=0.2, seed=3), run(U, fraction=0.2, seed=3), run(U, fraction=0.2, seed=4)
    np.testing.assert_array_equal(a.arrays["coordinates"], b.arrays["coordinates"])
    assert not np.array_equal(a.arrays["coordinates"], c.arrays["coordinates"])
    assert len(set(a.arrays["coordinates"])) == 8
    assert run(U, fraction=0.001).info["num_coordinates"] == 1


def test_nothing_kept_is_reported_empty():
    """All-zero updates: the median norm is 0 and no norm is strictly inside (0, 0)."""
    out = run(np.zeros((4, 5)))
    assert out.info["empty"] and not out.kept.any() and np.all(out.delta == 0)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="lower"):
        run(np.ones((3, 2)), lower=1.0)
    with pytest.raises(ValueError, match="coordinate_fraction"):
        run(np.ones((3, 2)), fraction=0.0)


# --------------------------------------------------------------------------- strategy


def test_the_strategy_removes_the_attacker_and_clips_to_the_median_norm():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("signguard"), g, ups)
    kept = np.isin(np.arange(N), extra["defense_kept"])
    assert extra["defense_rejected"] == [BAD] and extra["detection_recall"] == 1.0
    norms = np.linalg.norm(U[:, P], axis=1)
    scale = np.minimum(1.0, np.median(norms) / norms)
    np.testing.assert_allclose(extra["defense_scales"], np.round(scale, 6))
    expected = (scale[kept] @ U[kept][:, P]) / kept.sum()
    assert_update(new, g, with_statistics(U, expected, kept / kept.sum()))
    assert extra["defense_clip_norm"] == pytest.approx(float(np.median(norms)))


def test_a_round_where_nothing_passes_keeps_the_global_model():
    g = make_global()
    ups = make_updates()
    for u in ups:
        for k in u:
            u[k] = np.zeros_like(u[k])
    new, _, extra = aggregate(strategy("signguard"), g, ups)
    assert extra["defense_skipped"] is True and "no client passed" in extra["defense_skip_reason"]
    assert not any(k.startswith("detection_") for k in extra)
    assert all(np.array_equal(new[k], g[k]) for k in g)


@pytest.mark.parametrize("override, message", [
    ("defense.signguard.lower_bound=1", "defense.signguard.lower_bound: 1.0 is out of range"),
    ("defense.signguard.lower_bound=-0.1", "defense.signguard.lower_bound: -0.1 is out of range"),
    ("defense.signguard.upper_bound=1", "defense.signguard.upper_bound: 1.0 is out of range"),
    ("defense.signguard.coordinate_fraction=0", "defense.signguard.coordinate_fraction: 0.0 is out of range"),
    ("defense.signguard.coordinate_fraction=1.5", "defense.signguard.coordinate_fraction: 1.5 is out of range"),
])
def test_bad_parameters_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("defense.name=signguard", override)


def test_sign_features_are_the_same_in_small_column_chunks(monkeypatch):
    U = np.random.default_rng(4).normal(size=(6, 50))
    U[:, ::7] = 0.0
    idx = np.arange(3, 50, 2)
    whole = sign_features(U, idx)
    monkeypatch.setattr("flip_fl.defenses.common.CHUNK_ELEMENTS", 12)  # 2 columns of 6 rows per chunk
    np.testing.assert_array_equal(sign_features(U, idx), whole)
    assert np.all(whole[:, 1] > 0)  # zeros are counted
