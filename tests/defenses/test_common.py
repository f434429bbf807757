"""`flip_fl.defenses.common`: input checks every rule shares, exact pairwise distances, column chunking."""

from __future__ import annotations

import numpy as np
import pytest

from flip_fl.defenses import common
from flip_fl.defenses.bulyan import bulyan
from flip_fl.defenses.median import coordinate_median
from flip_fl.defenses.trimmed_mean import trimmed_mean
from tests.reference_rules import iterated_bulyan, mean


def test_invalid_inputs():
    with pytest.raises(ValueError, match="U must be a 2-D"):
        mean(np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        mean(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="weights"):
        mean(np.ones((2, 2)), weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        mean(np.ones((2, 2)), weights=[-1.0, 2.0])


def test_pairwise_distances_are_exact_where_the_gram_form_cancels():
    """Rows that share a large component and differ by ~1e-6: the Gram form loses every digit, differences do not."""
    rng = np.random.default_rng(0)
    shared = rng.standard_normal(50_000) * 100.0
    U = shared + 1e-6 * rng.standard_normal((5, 50_000))
    exact = np.array([[np.sum((U[i] - U[j]) ** 2) for j in range(5)] for i in range(5)])
    dists = common.pairwise_sq_dists(U)
    np.testing.assert_allclose(dists, exact, rtol=1e-9)
    gram = (U * U).sum(1)[:, None] + (U * U).sum(1)[None, :] - 2 * U @ U.T
    assert np.abs(gram - exact).max() > 100 * np.abs(dists - exact).max()


def test_coordinatewise_rules_chunking_consistent(monkeypatch):
    rng = np.random.default_rng(11)
    U = rng.standard_normal((7, 50))
    full = [coordinate_median(U), trimmed_mean(U, 0.2), iterated_bulyan(U, 1), bulyan(U, 1)]
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 20)  # force several column chunks
    chunked = [coordinate_median(U), trimmed_mean(U, 0.2), iterated_bulyan(U, 1), bulyan(U, 1)]
    for a, b in zip(full, chunked):
        np.testing.assert_allclose(a.delta, b.delta)
        np.testing.assert_allclose(a.weights, b.weights)
