"""AlignIns (`strategies/alignins.py`, `flip_fl.defenses.alignins`): TDA (cosine with the global model) and MPSA
(principal-sign agreement on the top-k coordinates), MZ-score filtering, clipping to the kept median norm; the numpy
rule by hand and against a loop port of the authors' `agg_alignins`, and the strategy on a hand-made round."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flip_fl.config import ConfigError
from flip_fl.defenses.alignins import alignins, mpsa, mz_scores
from flip_fl.defenses.updates import bn_statistic_mask
from tests.defenses.references import planted
from tests.defenses.rounds import (
    BAD,
    EXAMPLES,
    N,
    P,
    aggregate,
    assert_update,
    config,
    flat,
    make_global,
    make_updates,
    strategy,
    with_statistics,
)

# --------------------------------------------------------------------------- reference


def ref_alignins(U, theta, sparsity, lambda_s, lambda_c, data_sizes):
    """The authors' `agg_alignins` (src/aggregation.py) transcribed to Python loops: (kept, aggregate)."""
    n, d = len(U), len(U[0])
    signs = [[(x > 0) - (x < 0) for x in row] for row in U]
    major = [(s > 0) - (s < 0) for s in (sum(signs[i][j] for i in range(n)) for j in range(d))]
    k = int(d * sparsity)
    tda, mps = [], []
    for i in range(n):
        top = sorted(range(d), key=lambda j: -abs(U[i][j]))[:k]
        mps.append(sum(signs[i][j] == major[j] for j in top) / k)
        dot = sum(U[i][j] * theta[j] for j in range(d))
        tda.append(dot / (math.sqrt(sum(x * x for x in U[i])) * math.sqrt(sum(x * x for x in theta))))

    def mz(values):
        med, mean = float(np.median(values)), sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return [abs(v - med) / std for v in values]

    kept = [i for i in range(n) if mz(mps)[i] < lambda_s and mz(tda)[i] < lambda_c]
    norms = [math.sqrt(sum(x * x for x in row)) for row in U]
    clip = float(np.median([norms[i] for i in kept]))
    total = sum(data_sizes[i] for i in kept)
    agg = [sum(data_sizes[i] * U[i][j] * min(norms[i], clip) / norms[i] for i in kept) / total for j in range(d)]
    return kept, np.array(agg)


# --------------------------------------------------------------------------- numpy rule


def test_mz_score_is_the_distance_to_the_median_in_standard_deviations():
    x = [1.0, 2.0, 3.0, 10.0]
    std = math.sqrt(sum((v - 4.0) ** 2 for v in x) / 4)  # population std, as np.std in the authors' code
    np.testing.assert_allclose(mz_scores(x), [1.5 / std, 0.5 / std, 0.5 / std, 7.5 / std])
    assert mz_scores([0.3, 0.3, 0.3]).tolist() == [0.0, 0.0, 0.0]  # no spread: nobody is an outlier


def test_three_clients_by_hand():
    """Two clients agree, one has the opposite signs on its largest coordinates and points away from the model.

    theta = (1, 1, 1, 1); sparsity 0.5 -> the top-2 coordinates of each update. Principal signs (+, +, -, +).
    MPSA = (1, 1, 0): client 2's MZ-score is |0 - 1| / std(1, 1, 0) = 1 / 0.4714 = 2.12 > 1, clients 0 and 1
    score 0; TDA = cos(u_i, theta) = (0.63, 0.63, -0.58) fails client 2 as well. Kept: 0 and 1, both of norm
    sqrt(10), the median norm of the kept, so nothing is clipped: the aggregate is their weighted mean.
    """
    U = np.array([[3.0, 1.0, 0.0, 0.0], [1.0, 3.0, 0.0, 0.0], [-3.0, -1.0, -1.0, 1.0]])
    theta = np.ones(4)
    out = alignins(U, theta, sparsity=0.5, weights=[1.0, 3.0, 2.0])
    np.testing.assert_allclose(out.arrays["mpsa"], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(out.arrays["tda"], [4 / (math.sqrt(10) * 2), 4 / (math.sqrt(10) * 2),
                                                   -4 / (math.sqrt(12) * 2)])
    assert out.arrays["mz_mpsa"][2] == pytest.approx(1 / math.sqrt(2 / 9))
    assert out.kept.tolist() == [True, True, False] and out.info["top_k"] == 2
    assert out.info["clip_norm"] == pytest.approx(math.sqrt(10))
    np.testing.assert_allclose(out.weights, [0.25, 0.75, 0.0])
    np.testing.assert_allclose(out.delta, 0.25 * U[0] + 0.75 * U[1])


def test_kept_updates_are_clipped_to_their_median_norm():
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(40)
    U = np.stack([s * (direction + 0.01 * rng.standard_normal(40)) for s in (1.0, 1.0, 2.0, 3.0, 1.5)])
    out = alignins(U, direction, lambda_s=10.0, lambda_c=10.0)  # loose bounds: everyone kept
    norms = np.linalg.norm(U, axis=1)
    s = float(np.median(norms))
    assert out.kept.all() and out.info["clip_norm"] == pytest.approx(s)
    np.testing.assert_allclose(out.arrays["scale"], np.minimum(1.0, s / norms))
    np.testing.assert_allclose(out.delta, (np.minimum(1.0, s / norms) @ U) / 5)


def test_alignins_matches_the_authors_rule():
    rng = np.random.default_rng(7)
    theta = rng.standard_normal(30)
    honest = 0.3 * theta + rng.standard_normal((8, 30))
    U = np.vstack([honest, -2.0 * theta[None, :] + 0.1 * rng.standard_normal((2, 30))])
    sizes = rng.integers(10, 50, size=10).astype(float)
    out = alignins(U, theta, 0.3, 1.0, 1.0, sizes)
    kept, agg = ref_alignins(U.tolist(), theta.tolist(), 0.3, 1.0, 1.0, sizes.tolist())
    assert np.flatnonzero(out.kept).tolist() == kept and 8 not in kept and 9 not in kept
    np.testing.assert_allclose(out.delta, agg, atol=1e-12)


def test_alignins_removes_a_planted_outlier():
    U, honest_mean = planted(n_honest=9, d=30, seed=3)
    theta = np.ones(30)
    out = alignins(U, theta)
    assert not out.kept[-1] and out.weights[-1] == 0.0
    assert out.arrays["mz_mpsa"][-1] > 1 and out.arrays["mz_tda"][-1] > 1
    np.testing.assert_allclose(out.delta, honest_mean, atol=0.1)
    json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.info.items()})


def test_mpsa_top_k_and_nobody_kept():
    U = np.array([[5.0, -1.0, 0.0], [4.0, 1.0, 1.0], [3.0, 1.0, -2.0]])
    m, k = mpsa(U, 0.34)  # k = int(3 * 0.34) = 1: the largest coordinate only, where everyone agrees
    assert k == 1 and m.tolist() == [1.0, 1.0, 1.0]
    m, k = mpsa(U, 1.0)  # principal signs (+, +, 0): client 0's zero agrees with the tie, its -1 does not
    assert k == 3 and m.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    assert mpsa(U, 0.01)[1] == 1  # at least one coordinate
    four = np.vstack([U, [[1.0, 2.0, 3.0]]])  # 4 distinct TDAs: no client sits on the median
    none = alignins(four, np.ones(3), lambda_s=1e-9, lambda_c=1e-9)
    assert not none.kept.any() and np.array_equal(none.delta, np.zeros(3)) and np.isnan(none.info["clip_norm"])


def test_bad_arguments_are_value_errors():
    U = np.ones((3, 4))
    with pytest.raises(ValueError, match="sparsity must be in"):
        alignins(U, np.ones(4), sparsity=0.0)
    with pytest.raises(ValueError, match="global_params must be 4 finite values"):
        alignins(U, np.ones(3))
    with pytest.raises(ValueError, match="lambda_s and lambda_c must be > 0"):
        alignins(U, np.ones(4), lambda_c=0.0)


# --------------------------------------------------------------------------- strategy


def test_alignins_round_uses_the_global_model_and_rejects_the_attacker():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("alignins"), g, ups)
    theta = flat(g)[~bn_statistic_mask(g)]
    ref = alignins(U[:, P], theta, 0.3, 1.0, 1.0, EXAMPLES)
    kept = np.isin(np.arange(N), extra["defense_kept"])
    np.testing.assert_array_equal(kept, ref.kept)
    assert not kept[BAD] and extra["detection_recall"] == 1.0
    np.testing.assert_allclose(extra["defense_scales"], ref.arrays["scale"], atol=1e-6)
    assert_update(new, g, with_statistics(U, ref.delta, ref.weights), atol=1e-5)


def test_bad_alignins_settings_are_config_errors():
    with pytest.raises(ConfigError, match="defense.alignins.sparsity: 1.5 is out of range"):
        config("alignins", "defense.alignins.sparsity=1.5")
    with pytest.raises(ConfigError, match="defense.alignins.lambda_c: 0.0 is out of range"):
        config("alignins", "defense.alignins.lambda_c=0")
