"""FLAME (`strategies/flame.py`, `flip_fl.defenses.flame.flame`): clustering, clipping to the median norm and
noise; the numpy rule and the strategy on a hand-made round (noise on trained parameters only)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flip_fl.defenses.flame import flame
from tests.defenses.references import planted
from tests.defenses.rounds import (
    BAD,
    INTEGER,
    N,
    P,
    aggregate,
    applied_delta,
    assert_update,
    make_global,
    make_updates,
    strategy,
    with_statistics,
)

# --------------------------------------------------------------------------- numpy rule


def test_flame_rejects_outlier_and_clips():
    U, honest_mean = planted(n_honest=9, d=30, seed=3)
    out = flame(U, None, noise_lambda=0.0, rng=None)
    assert not out.kept[-1] and out.weights[-1] == 0.0
    norms = np.linalg.norm(U, axis=1)
    assert out.info["clip_norm"] == pytest.approx(float(np.median(norms)))
    assert out.info["cluster_size"] == int(out.kept.sum())
    assert out.info["min_cluster_size"] == 10 // 2 + 1
    s = out.info["clip_norm"]
    kept = np.flatnonzero(out.kept)
    ref = sum(min(1.0, s / norms[i]) * U[i] for i in kept) / len(kept)
    np.testing.assert_allclose(out.delta, ref)
    np.testing.assert_allclose(out.delta, honest_mean, atol=0.1)


def test_flame_clustering_mask_excludes_bn_statistics():
    rng = np.random.default_rng(0)
    real = 1.0 + 0.05 * rng.standard_normal((9, 20))
    attacker = -1.0 + 0.05 * rng.standard_normal((1, 20))
    bn = 100.0 + 20.0 * rng.standard_normal((10, 20))  # large, data-dependent "BN statistics"
    U = np.hstack([np.vstack([real, attacker]), bn])
    mask = np.zeros(40, dtype=bool)
    mask[:20] = True
    unmasked = flame(U, None, 0.0, None)
    masked = flame(U, mask, 0.0, None)
    assert unmasked.kept[-1]  # clustering driven by the BN block misses the attacker
    assert not masked.kept[-1] and masked.kept[:9].sum() >= 6
    # only the masked columns matter for the clustering decision
    only_real = flame(U[:, :20], None, 0.0, None)
    np.testing.assert_array_equal(masked.kept, only_real.kept)


def test_flame_noise_and_all_noise_fallback():
    U, _ = planted(n_honest=9, d=4000, seed=1)
    base = flame(U, None, 0.0, None)
    noisy = flame(U, None, 0.01, np.random.default_rng(0))
    assert noisy.info["noise_std"] == pytest.approx(0.01 * base.info["clip_norm"])
    emp = np.std(noisy.delta - base.delta)
    assert abs(emp - noisy.info["noise_std"]) < 0.1 * noisy.info["noise_std"]
    one = flame(U[:1], None, 0.0, None)
    assert one.kept.all() and one.info["all_noise"]
    json.dumps(noisy.info)


# --------------------------------------------------------------------------- strategy


def test_flame_excludes_the_outlier_clips_and_adds_noise_to_parameters_only():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("flame", "defense.flame.noise_lambda=0"), g, ups)
    kept = np.isin(np.arange(N), extra["defense_kept"])
    assert not kept[BAD] and kept.sum() >= N // 2 + 1 and extra["detection_recall"] == 1.0
    np.testing.assert_array_equal(kept, flame(U[:, P], None, 0.0, None).kept)
    norms = np.linalg.norm(U[:, P], axis=1)
    expected = (np.minimum(1.0, np.median(norms) / norms)[kept] @ U[kept][:, P]) / kept.sum()
    expected = with_statistics(U, expected, kept / kept.sum())
    assert_update(new, g, expected, atol=1e-5)
    noisy = applied_delta(aggregate(strategy("flame", "defense.flame.noise_lambda=0.1"), g, ups)[0], g) - expected
    assert np.all(noisy[~P & ~INTEGER] == pytest.approx(0.0, abs=1e-6))
    assert np.std(noisy[P]) > 0.01
