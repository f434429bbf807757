"""Norm clipping (`strategies/norm_clip.py`, `flip_fl.defenses.clipping.norm_clip`): the numpy rule against a loop
and the strategy on a hand-made round (fixed radius and the median-norm default)."""

from __future__ import annotations

import numpy as np
import pytest

from flip_fl.defenses.clipping import norm_clip
from tests.defenses.references import planted
from tests.defenses.rounds import (
    P,
    aggregate,
    assert_update,
    example_weights,
    make_global,
    make_updates,
    strategy,
    with_statistics,
)

# --------------------------------------------------------------------------- numpy rule


def test_norm_clip_bounds_each_contribution():
    U, _ = planted()
    out = norm_clip(U, 2.0)
    for i in range(U.shape[0]):
        contrib = out.arrays["scale"][i] * U[i]
        assert np.linalg.norm(contrib) <= 2.0 + 1e-12
        expected = min(1.0, 2.0 / np.linalg.norm(U[i])) * U[i]
        np.testing.assert_allclose(contrib, expected)
    assert np.linalg.norm(out.delta) <= 2.0 + 1e-12
    assert out.info["num_clipped"] == int(sum(np.linalg.norm(u) > 2.0 for u in U))
    w = np.arange(1.0, 9.0)
    outw = norm_clip(U, 2.0, w)
    ref = sum(w[i] * min(1.0, 2.0 / np.linalg.norm(U[i])) * U[i] for i in range(8)) / w.sum()
    np.testing.assert_allclose(outw.delta, ref)
    with pytest.raises(ValueError, match="max_norm"):
        norm_clip(U, 0.0)


# --------------------------------------------------------------------------- strategy


def test_norm_clip_scales_each_update_into_the_ball():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("norm_clip", "defense.norm_clip.clip_norm=1.5"), g, ups)
    scale = np.minimum(1.0, 1.5 / np.linalg.norm(U[:, P], axis=1))
    w = example_weights()
    assert_update(new, g, with_statistics(U, (w * scale) @ U[:, P], w), atol=1e-5)
    np.testing.assert_allclose(extra["defense_scales"], scale, atol=1e-6)
    median_clip = aggregate(strategy("norm_clip"), g, ups)[2]
    assert median_clip["defense_max_norm"] == pytest.approx(np.median(np.linalg.norm(U[:, P], axis=1)))
