"""FreqFed (`strategies/freqfed.py`, `flip_fl.defenses.freqfed`): low-frequency 2-D DCT coefficients, HDBSCAN on
their cosine distances, FedAvg of the largest cluster; the numpy rule against an explicit DCT matrix and by hand,
and the strategy on a hand-made round."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flip_fl.defenses.freqfed import freqfed, low_frequency_features, low_frequency_mask
from strategies.freqfed import trained_shapes
from tests.defenses.references import planted
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

# --------------------------------------------------------------------------- references


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix C (C @ x is the DCT of x), from its definition."""
    C = np.empty((n, n))
    for k in range(n):
        for i in range(n):
            C[k, i] = np.sqrt((1.0 if k == 0 else 2.0) / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    return C


def ref_features(row: np.ndarray, shapes: list[tuple[int, ...]]) -> np.ndarray:
    """FreqFed's vector of one update by loops: C_P X C_Q^T per tensor, coefficients with i + j <= P // 2."""
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        X = row[start:start + size].reshape(shape[0], -1)
        V = dct_matrix(X.shape[0]) @ X @ dct_matrix(X.shape[1]).T
        out += [V[i, j] for i in range(V.shape[0]) for j in range(V.shape[1]) if i + j <= V.shape[0] // 2]
        start += size
    return np.array(out)


# --------------------------------------------------------------------------- numpy rule


def test_the_low_frequency_triangle():
    assert low_frequency_mask(4, 3).tolist() == [[True, True, True], [True, True, False], [True, False, False],
                                                 [False, False, False]]
    assert low_frequency_mask(5, 1)[:, 0].tolist() == [True, True, True, False, False]  # a vector: its low half
    assert low_frequency_mask(1, 6).tolist() == [[True, False, False, False, False, False]]


def test_features_are_the_orthonormal_2d_dct_coefficients_of_each_tensor():
    rng = np.random.default_rng(0)
    shapes = [(4, 2, 3), (5,), (3, 7)]
    U = rng.standard_normal((3, 24 + 5 + 21))
    F = low_frequency_features(U, shapes)
    for i in range(3):
        np.testing.assert_allclose(F[i], ref_features(U[i], shapes), atol=1e-12)
    assert F.shape[1] == int(sum(low_frequency_mask(s[0], int(np.prod(s[1:]))).sum() for s in shapes))
    # without shapes the update is one column: the low half of its 1-D DCT
    np.testing.assert_allclose(low_frequency_features(U), (U @ dct_matrix(50).T)[:, :26], atol=1e-12)
    with pytest.raises(ValueError, match="shapes cover 49 entries but U has d = 50"):
        low_frequency_features(U, [(4, 2, 3), (5,), (4, 5)])


def test_high_frequencies_do_not_change_the_features():
    """Two updates that differ only in coefficients outside the triangle are the same to FreqFed."""
    rng = np.random.default_rng(1)
    C6, C4 = dct_matrix(6), dct_matrix(4)
    V = rng.standard_normal((6, 4))
    high = np.where(low_frequency_mask(6, 4), 0.0, 10.0 * rng.standard_normal((6, 4)))
    a, b = ((C6.T @ M @ C4).ravel() for M in (V, V + high))  # inverse DCT: C is orthonormal
    assert np.linalg.norm(a - b) > 5
    np.testing.assert_allclose(*low_frequency_features(np.stack([a, b]), [(6, 4)]), atol=1e-12)


def test_freqfed_keeps_the_clean_majority_and_averages_it():
    U, honest_mean = planted(n_honest=9, d=30, seed=3)
    shapes = [(5, 4), (10,)]
    weights = np.arange(1.0, 11.0)
    out = freqfed(U, shapes, weights)
    assert not out.kept[-1] and out.weights[-1] == 0.0 and out.kept.sum() >= 10 // 2 + 1
    assert out.info["cluster_size"] == out.kept.sum() and out.info["min_cluster_size"] == 6
    kept = np.flatnonzero(out.kept)
    np.testing.assert_allclose(out.delta, weights[kept] @ U[kept] / weights[kept].sum())
    np.testing.assert_allclose(out.weights.sum(), 1.0)
    np.testing.assert_allclose(out.delta, honest_mean, atol=0.1)
    json.dumps(out.info)


def test_three_clients_by_hand():
    """Two updates alike in their low frequencies, one opposite: the pair is the majority (2 = 3 // 2 + 1) and its
    example-weighted mean is the aggregate."""
    U = np.array([[1.0, 2.0, 3.0, 4.0], [1.1, 2.1, 2.9, 4.2], [-1.0, -2.0, -3.0, -4.0]])
    out = freqfed(U, [(2, 2)], [1.0, 3.0, 6.0])
    assert out.kept.tolist() == [True, True, False]
    np.testing.assert_allclose(out.weights, [0.25, 0.75, 0.0])
    np.testing.assert_allclose(out.delta, 0.25 * U[0] + 0.75 * U[1])
    # the vectors: for a 2 x 2 tensor, floor(2 / 2) = 1 keeps V00, V01, V10 (the DC and both first harmonics)
    C = dct_matrix(2)
    V = C @ U[0].reshape(2, 2) @ C.T
    np.testing.assert_allclose(out.arrays["features"][0], [V[0, 0], V[0, 1], V[1, 0]], atol=1e-12)


def test_a_single_client_is_kept_and_two_clients_are_one_cluster():
    one = freqfed(np.ones((1, 4)))
    assert one.kept.all() and one.info["all_noise"] and np.array_equal(one.delta, np.ones(4))
    two = freqfed(np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0]]), weights=[1.0, 3.0])
    assert two.kept.all() and two.info["min_cluster_size"] == 2  # n // 2 + 1 = n: no majority can be told apart
    np.testing.assert_allclose(two.delta, [-0.5, -1.0, -1.5, -2.0])


# --------------------------------------------------------------------------- strategy


def test_freqfed_round_rejects_the_attacker_and_averages_the_cluster():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("freqfed"), g, ups)
    kept = np.isin(np.arange(N), extra["defense_kept"])
    assert not kept[BAD] and kept.sum() >= N // 2 + 1 and extra["detection_recall"] == 1.0
    assert trained_shapes(g) == [(3, 2), (2,), (2, 3), (2,)]
    np.testing.assert_array_equal(kept, freqfed(U[:, P], trained_shapes(g)).kept)
    w = np.where(kept, EXAMPLES, 0) / np.where(kept, EXAMPLES, 0).sum()
    assert_update(new, g, with_statistics(U, w @ U[:, P], w), atol=1e-5)
    assert extra["defense_cluster_size"] == kept.sum() and extra["defense_all_noise"] is False
