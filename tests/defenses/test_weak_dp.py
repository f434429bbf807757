"""Weak DP (`strategies/weak_dp.py`, `flip_fl.defenses.clipping.weak_dp`): norm clipping plus seeded Gaussian noise,
the numpy rule and the strategy (noise on trained parameters only, sized for the model whatever server.lr)."""

from __future__ import annotations

import numpy as np
import pytest

from flip_fl.defenses.clipping import norm_clip, weak_dp
from tests.defenses.references import planted
from tests.defenses.rounds import INTEGER, P, aggregate, applied_delta, make_global, make_updates, strategy

# --------------------------------------------------------------------------- numpy rule


def test_weak_dp_noise():
    U, _ = planted(d=2000)
    clip = norm_clip(U, 3.0).delta
    out0 = weak_dp(U, 3.0, 0.0, None)
    np.testing.assert_allclose(out0.delta, clip)
    out = weak_dp(U, 3.0, 0.5, np.random.default_rng(42))
    np.testing.assert_allclose(out.delta - clip, np.random.default_rng(42).normal(0, 0.5, 2000))
    mask = np.zeros(2000, dtype=bool)
    mask[:1000] = True
    outm = weak_dp(U, 3.0, 0.5, np.random.default_rng(1), noise_mask=mask)
    np.testing.assert_allclose(outm.delta[1000:], clip[1000:])
    assert abs(np.std(outm.delta[:1000] - clip[:1000]) - 0.5) < 0.05
    with pytest.raises(ValueError, match="rng"):
        weak_dp(U, 3.0, 0.5, None)
    with pytest.raises(ValueError, match="noise_std"):
        weak_dp(U, 3.0, -1.0, None)


# --------------------------------------------------------------------------- strategy


def test_weak_dp_adds_seeded_noise_to_parameters_only():
    g, ups = make_global(), make_updates()
    noiseless = strategy("weak_dp", "defense.weak_dp.noise_std=0", "defense.weak_dp.clip_norm=1.5")
    clipped = applied_delta(aggregate(noiseless, g, ups)[0], g)
    reference = applied_delta(aggregate(strategy("norm_clip", "defense.norm_clip.clip_norm=1.5"), g, ups)[0], g)
    np.testing.assert_allclose(clipped, reference, atol=1e-6)
    noisy = [applied_delta(aggregate(strategy("weak_dp", "defense.weak_dp.noise_std=0.5",
                                              "defense.weak_dp.clip_norm=1.5", "server.lr=0.5"), g, ups)[0], g)
             for _ in range(2)]
    np.testing.assert_array_equal(noisy[0], noisy[1])  # same seed and round, same noise
    noise = noisy[0] - 0.5 * reference
    assert np.all(noise[~P & ~INTEGER] == pytest.approx(0.0, abs=1e-6))
    assert 0.2 < np.std(noise[P]) < 0.9  # std 0.5 reaches the model whatever server.lr
