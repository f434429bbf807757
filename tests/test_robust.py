"""Tests for the aggregation rules of flip_fl.defenses: each rule against an independent brute-force reference,
planted-outlier behaviour, argument validation, and agreement with Flower's built-ins."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from flip_fl.defenses import common
from flip_fl.defenses.bulyan import bulyan
from flip_fl.defenses.clipping import norm_clip, weak_dp
from flip_fl.defenses.flame import flame
from flip_fl.defenses.fltrust import fltrust
from flip_fl.defenses.foolsgold import foolsgold
from flip_fl.defenses.krum import krum
from flip_fl.defenses.median import coordinate_median
from flip_fl.defenses.rfa import geometric_median
from flip_fl.defenses.rlr import robust_lr
from flip_fl.defenses.trimmed_mean import trimmed_mean
from flip_fl.defenses.updates import bn_statistic_mask, flatten_state, unflatten
from flip_fl.evaluation.detection import detection_scores
from tests.reference_rules import iterated_bulyan, mean

# --------------------------------------------------------------------------- fixtures


def planted(n_honest: int = 7, d: int = 12, seed: int = 0, scale: float = 1000.0):
    """n_honest updates near (1, ..., 1) plus one huge update (the last row)."""
    rng = np.random.default_rng(seed)
    honest = 1.0 + 0.05 * rng.standard_normal((n_honest, d))
    outlier = np.full((1, d), scale)
    outlier[0, ::2] = -scale  # also a different direction
    return np.vstack([honest, outlier]), honest.mean(axis=0)


def dist2(a, b):
    return sum((float(x) - float(y)) ** 2 for x, y in zip(a, b))


def ref_krum_scores(rows, f):
    n = len(rows)
    scores = []
    for i in range(n):
        ds = sorted(dist2(rows[i], rows[j]) for j in range(n) if j != i)
        scores.append(sum(ds[: max(1, min(n - 1, n - f - 2))]))
    return scores


def ref_sorted_column(U, j):
    return sorted(float(U[i, j]) for i in range(U.shape[0]))


# --------------------------------------------------------------------------- mean


def test_mean_weighted_matches_loop():
    rng = np.random.default_rng(1)
    U = rng.standard_normal((5, 4))
    w = np.array([1.0, 2.0, 3.0, 0.0, 4.0])
    out = mean(U, w)
    ref = sum(w[i] * U[i] for i in range(5)) / w.sum()
    np.testing.assert_allclose(out.delta, ref)
    np.testing.assert_allclose(out.weights, w / w.sum())
    assert out.kept.all()
    np.testing.assert_allclose(mean(U).delta, U.mean(axis=0))


def test_invalid_inputs():
    with pytest.raises(ValueError, match="U must be a 2-D"):
        mean(np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        mean(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="weights"):
        mean(np.ones((2, 2)), weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        mean(np.ones((2, 2)), weights=[-1.0, 2.0])


# --------------------------------------------------------------------------- krum


@pytest.mark.parametrize("f", [0, 1, 2])
def test_krum_matches_bruteforce(f):
    rng = np.random.default_rng(10 + f)
    U = rng.standard_normal((9, 6)) * rng.uniform(0.5, 3.0, (9, 1))
    out = krum(U, f)
    scores = ref_krum_scores(U, f)
    np.testing.assert_allclose(out.arrays["scores"], scores, rtol=1e-10)
    best = int(np.argmin(scores))
    np.testing.assert_allclose(out.delta, U[best])
    assert out.kept.tolist() == [i == best for i in range(9)]
    assert out.weights[best] == 1.0 and out.weights.sum() == 1.0


def test_multikrum_matches_bruteforce():
    rng = np.random.default_rng(3)
    U = rng.standard_normal((10, 5))
    scores = ref_krum_scores(U, 2)
    chosen = sorted(range(10), key=lambda i: scores[i])[:4]
    out = krum(U, 2, multi_k=4)
    np.testing.assert_allclose(out.delta, U[chosen].mean(axis=0))
    assert set(np.flatnonzero(out.kept)) == set(chosen)
    w = np.arange(1.0, 11.0)
    outw = krum(U, 2, multi_k=4, weights=w)
    np.testing.assert_allclose(outw.delta, (w[chosen, None] * U[chosen]).sum(0) / w[chosen].sum())


def test_krum_and_multikrum_reject_planted_outlier():
    U, honest_mean = planted()
    for k in (1, 5):
        out = krum(U, 1, multi_k=k)
        assert not out.kept[-1] and out.weights[-1] == 0.0
        np.testing.assert_allclose(out.delta, honest_mean, atol=0.2)


def test_krum_validation():
    U = np.ones((6, 2))
    with pytest.raises(ValueError, match="num_malicious"):
        krum(U, 2)  # needs n > 2f + 2 = 6
    with pytest.raises(ValueError, match="num_malicious"):
        krum(U, -1)
    with pytest.raises(ValueError, match="multi_k"):
        krum(U, 1, multi_k=7)
    with pytest.raises(ValueError, match="multi_k"):
        krum(U, 1, multi_k=0)
    # strict=False: Flower's rule, max(1, n - f - 2) neighbours and no bound on f
    rng = np.random.default_rng(0)
    V = rng.standard_normal((10, 3))
    loose = krum(V, 4, strict=False)
    assert loose.info["num_neighbors"] == 4
    np.testing.assert_allclose(loose.delta, V[int(np.argmin(ref_krum_scores(V, 4)))])
    beyond = krum(V, 8, strict=False)
    assert beyond.info["num_neighbors"] == 1
    np.testing.assert_allclose(beyond.delta, V[int(np.argmin(ref_krum_scores(V, 8)))])
    assert krum(V[:1], 3, strict=False).kept.tolist() == [True]


# --------------------------------------------------------------------------- bulyan


def ref_bulyan(U, f):
    n, d = U.shape
    theta, beta = n - 2 * f, n - 4 * f
    remaining = list(range(n))
    selected = []
    for _ in range(theta):
        if len(remaining) == 1:
            pick = remaining[0]
        else:
            s = ref_krum_scores([U[i] for i in remaining], f)
            pick = remaining[s.index(min(s))]
        selected.append(pick)
        remaining.remove(pick)
    out = []
    for j in range(d):
        vals = [float(U[i, j]) for i in selected]
        med = float(np.median(vals))
        closest = sorted(vals, key=lambda v: abs(v - med))[:beta]
        out.append(sum(closest) / beta)
    return np.array(out), selected


@pytest.mark.parametrize("n,f", [(7, 1), (11, 2), (8, 1), (5, 0)])
def test_bulyan_matches_bruteforce(n, f):
    rng = np.random.default_rng(n * 10 + f)
    U = rng.standard_normal((n, 7)) * rng.uniform(0.5, 3.0, (n, 1))
    out = iterated_bulyan(U, f)
    ref, selected = ref_bulyan(U, f)
    np.testing.assert_allclose(out.delta, ref, rtol=1e-12, atol=1e-12)
    assert out.arrays["selection_order"].tolist() == selected
    assert set(np.flatnonzero(out.kept)) == set(selected)
    assert math.isclose(out.weights.sum(), 1.0)
    assert out.info["theta"] == n - 2 * f and out.info["beta"] == n - 4 * f


@pytest.mark.parametrize("n,f", [(7, 1), (11, 2), (8, 1), (5, 0), (15, 3)])
def test_production_bulyan_selects_as_the_paper(n, f):
    """The default selection is the paper's iterated Krum: same picks, same order, same aggregate."""
    rng = np.random.default_rng(n * 100 + f)
    U = rng.standard_normal((n, 9)) * rng.uniform(0.5, 3.0, (n, 1))
    out = bulyan(U, f)
    ref, selected = ref_bulyan(U, f)
    assert out.info["selection"] == "iterated" and out.arrays["selection_order"].tolist() == selected
    np.testing.assert_allclose(out.delta, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="selection"):
        bulyan(U, f, "twice")  # type: ignore[arg-type]


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


def test_bulyan_rejects_planted_outliers():
    rng = np.random.default_rng(5)
    honest = 1.0 + 0.05 * rng.standard_normal((9, 8))
    bad = np.vstack([np.full(8, 500.0), np.full(8, -300.0)])
    U = np.vstack([honest, bad])
    out = iterated_bulyan(U, 2)
    assert not out.kept[-2:].any()
    assert (out.weights[-2:] == 0).all()
    np.testing.assert_allclose(out.delta, honest.mean(0), atol=0.1)


def test_bulyan_validation():
    with pytest.raises(ValueError, match="num_malicious"):
        iterated_bulyan(np.ones((10, 2)), 2)  # needs n >= 11


# --------------------------------------------------------------------------- median / trimmed mean


@pytest.mark.parametrize("n", [7, 8])
def test_coordinate_median_matches_loop(n):
    rng = np.random.default_rng(n)
    U = rng.standard_normal((n, 9))
    out = coordinate_median(U)
    ref = []
    for j in range(9):
        c = ref_sorted_column(U, j)
        ref.append(c[n // 2] if n % 2 else 0.5 * (c[n // 2 - 1] + c[n // 2]))
    np.testing.assert_allclose(out.delta, ref)
    assert math.isclose(out.weights.sum(), 1.0) and out.kept.all()


def test_median_and_trimmed_mean_ignore_planted_outlier():
    U, honest_mean = planted()
    med = coordinate_median(U)
    assert med.weights[-1] == 0.0
    np.testing.assert_allclose(med.delta, honest_mean, atol=0.1)
    tm = trimmed_mean(U, 0.125)  # trims 1 per side of 8
    assert tm.weights[-1] == 0.0 and tm.info["num_trimmed_per_side"] == 1
    np.testing.assert_allclose(tm.delta, honest_mean, atol=0.1)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.3, 0.45])
def test_trimmed_mean_matches_loop(beta):
    rng = np.random.default_rng(7)
    n = 10
    U = rng.standard_normal((n, 6))
    k = int(beta * n)
    ref = [sum(ref_sorted_column(U, j)[k : n - k]) / (n - 2 * k) for j in range(6)]
    out = trimmed_mean(U, beta)
    np.testing.assert_allclose(out.delta, ref)
    assert math.isclose(out.weights.sum(), 1.0)


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7])
def test_trimmed_mean_validation(beta):
    with pytest.raises(ValueError, match=r"beta .*\[0, 0.5\)"):
        trimmed_mean(np.ones((4, 2)), beta)


def test_coordinatewise_rules_chunking_consistent(monkeypatch):
    rng = np.random.default_rng(11)
    U = rng.standard_normal((7, 50))
    full = [coordinate_median(U), trimmed_mean(U, 0.2), iterated_bulyan(U, 1), bulyan(U, 1)]
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 20)  # force several column chunks
    chunked = [coordinate_median(U), trimmed_mean(U, 0.2), iterated_bulyan(U, 1), bulyan(U, 1)]
    for a, b in zip(full, chunked):
        np.testing.assert_allclose(a.delta, b.delta)
        np.testing.assert_allclose(a.weights, b.weights)


# --------------------------------------------------------------------------- clipping / DP


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


# --------------------------------------------------------------------------- geometric median


def test_geometric_median_collinear_is_median_point():
    direction = np.array([1.0, -2.0, 0.5, 3.0])
    ts = [-3.0, -1.0, 0.0, 2.0, 50.0]
    U = np.array([t * direction for t in ts]) + np.array([1.0, 1.0, 1.0, 1.0])
    out = geometric_median(U, iters=2000, tol=0.0, eps=1e-9)
    np.testing.assert_allclose(out.delta, U[2], atol=1e-6)
    np.testing.assert_allclose(out.weights @ U, out.delta)


def test_geometric_median_matches_bruteforce_weiszfeld():
    rng = np.random.default_rng(4)
    U = rng.standard_normal((6, 3))
    a = np.array([1.0, 2.0, 1.0, 3.0, 1.0, 1.0])
    a = a / a.sum()
    z = a @ U
    for _ in range(4):
        b = [a[i] / max(1e-6, math.sqrt(dist2(z, U[i]))) for i in range(6)]
        z = sum(b[i] * U[i] for i in range(6)) / sum(b)
    out = geometric_median(U, weights=a * 7, iters=4, tol=0.0)
    np.testing.assert_allclose(out.delta, z)
    assert out.info["iterations"] == 4 and not out.info["converged"]
    # The converged point minimises the sum of distances.
    conv = geometric_median(U, weights=a, iters=10_000, tol=1e-14)
    assert conv.info["converged"]
    obj = lambda z: sum(a[i] * np.linalg.norm(z - U[i]) for i in range(6))  # noqa: E731
    for _ in range(20):
        assert obj(conv.delta) <= obj(conv.delta + 1e-3 * rng.standard_normal(3)) + 1e-9


def test_geometric_median_robust_to_outlier():
    U, honest_mean = planted()
    out = geometric_median(U)
    np.testing.assert_allclose(out.delta, honest_mean, atol=0.1)
    assert out.weights[-1] < 1e-3


# --------------------------------------------------------------------------- FoolsGold


def ref_foolsgold(H, kappa=1.0):
    """Reference FoolsGold weights, following the authors' published algorithm."""
    n = H.shape[0]
    cs = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            ni, nj = np.linalg.norm(H[i]), np.linalg.norm(H[j])
            cs[i, j] = (H[i] @ H[j]) / (ni * nj) if ni > 0 and nj > 0 else 0.0
        cs[i, i] -= 1.0
    maxcs = cs.max(axis=1)
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i, j] = cs[i, j] * maxcs[i] / maxcs[j]
    wv = [min(1.0, max(0.0, 1.0 - max(cs[i]))) for i in range(n)]
    top = max(wv)
    wv = [w / top for w in wv]
    wv = [0.99 if w == 1.0 else w for w in wv]
    out = []
    for w in wv:
        v = kappa * (math.log(w / (1 - w)) + 0.5) if w > 0 else 0.0
        out.append(min(1.0, max(0.0, v)))
    return np.array(out)


def sybil_setup(seed=0, d=40):
    rng = np.random.default_rng(seed)
    honest = rng.standard_normal((5, d))  # diverse directions
    sybil = np.tile(rng.standard_normal(d), (3, 1))  # 3 identical sybils
    return np.vstack([honest, sybil])


def test_foolsgold_downweights_identical_sybils():
    U = sybil_setup()
    out = foolsgold(U, None)
    assert np.all(out.arrays["scores"][5:] == 0.0)
    assert not out.kept[5:].any() and out.kept[:5].all()
    assert np.all(out.arrays["scores"][:5] > 0.5)
    np.testing.assert_allclose(out.delta, (out.arrays["scores"][:5] @ U[:5]) / out.arrays["scores"][:5].sum())
    np.testing.assert_allclose(out.arrays["history"], U)


@pytest.mark.parametrize("kappa", [1.0, 0.5])
def test_foolsgold_matches_reference(kappa):
    rng = np.random.default_rng(8)
    base = rng.standard_normal(20)
    U = np.vstack([rng.standard_normal((4, 20)), base + 0.3 * rng.standard_normal((3, 20))])
    hist = rng.standard_normal((7, 20))
    out = foolsgold(U, hist, confidence=kappa, epsilon=0.0)
    np.testing.assert_allclose(out.arrays["scores"], ref_foolsgold(hist + U, kappa), atol=1e-12)
    un = foolsgold(U, hist, confidence=kappa, epsilon=0.0, normalize=False)
    np.testing.assert_allclose(un.delta, out.arrays["scores"] @ U / 7)


def test_foolsgold_history_accumulates_and_mask():
    U1, U2 = sybil_setup(1), sybil_setup(2)
    first = foolsgold(U1, None)
    second = foolsgold(U2, first.arrays["history"])
    np.testing.assert_allclose(second.arrays["history"], U1 + U2)
    mask = np.zeros(U1.shape[1], dtype=bool)
    mask[:10] = True
    m = foolsgold(U1, None, similarity_mask=mask)
    assert m.arrays["history"].shape == (8, 10)
    with pytest.raises(ValueError, match="history"):
        foolsgold(U1, np.zeros((8, 40)), similarity_mask=mask)


def test_foolsgold_all_identical_gives_zero_delta():
    U = np.tile(np.arange(1.0, 5.0), (4, 1))
    out = foolsgold(U)
    assert np.all(out.delta == 0) and not out.kept.any()


# --------------------------------------------------------------------------- RLR


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


# --------------------------------------------------------------------------- FLTrust


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


# --------------------------------------------------------------------------- FLAME


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


# --------------------------------------------------------------------------- detection metrics


def test_detection_scores_hand_example():
    kept = [True, False, False, True, True, False]
    mal = [False, True, False, True, False, True]
    s = detection_scores(kept, mal)
    # rejected: 1 (mal), 2 (benign), 5 (mal) -> TP 2, FP 1; kept malicious: 3 -> FN 1
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (2, 1, 1, 2)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["rejection_rate"] == pytest.approx(0.5)
    assert s["false_positive_rate"] == pytest.approx(1 / 3)


def test_detection_scores_undefined_cases_are_none():
    nothing = detection_scores([True, True], [False, False])
    assert nothing["precision"] is None and nothing["recall"] is None and nothing["f1"] is None
    assert nothing["rejection_rate"] == 0.0
    missed = detection_scores([True, False], [True, False])
    assert missed["precision"] == 0.0 and missed["recall"] == 0.0 and missed["f1"] == 0.0
    json.dumps(missed)


# --------------------------------------------------------------------------- state helpers


def test_flatten_unflatten_roundtrip_and_bn_mask():
    template = {
        "conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bn.weight": np.ones(2, dtype=np.float32),
        "bn.running_mean": np.zeros(2, dtype=np.float32),
        "bn.running_var": np.ones(2, dtype=np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }
    other = {k: v + 1 for k, v in template.items()}
    M = flatten_state([template, other])
    assert M.shape == (2, 13) and M.dtype == np.float64
    back = unflatten(M[1], template)
    for k in template:
        assert back[k].dtype == template[k].dtype and back[k].shape == template[k].shape
        np.testing.assert_array_equal(back[k], other[k])
    mask = bn_statistic_mask(template)
    assert mask.tolist() == [False] * 8 + [True] * 5
    keys = ["bn.weight", "conv.weight"]
    assert flatten_state([template], keys).shape == (1, 8)
    with pytest.raises(ValueError):
        unflatten(np.zeros(5), template)


# --------------------------------------------------------------------------- Flower comparison

flwr = pytest.importorskip("flwr")
logging.getLogger("flwr").setLevel(logging.WARNING)


def _legacy():
    try:
        from flwr.server.strategy import aggregate as agg
    except ImportError:  # pragma: no cover - depends on the installed flwr
        pytest.skip("flwr.server.strategy.aggregate not importable")
    return agg


def _replies(U, num_examples=None):
    """Build reply Messages like those a new-style strategy receives."""
    try:
        from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict
    except ImportError:  # pragma: no cover
        pytest.skip("flwr.app message API not importable")
    out = []
    for i, u in enumerate(U):
        md = Metadata(
            run_id=0,
            message_id=str(i),
            src_node_id=i + 1,
            dst_node_id=0,
            reply_to_message_id="q",
            group_id="",
            created_at=0.0,
            ttl=3600.0,
            message_type="train",
        )
        ne = 1 if num_examples is None else int(num_examples[i])
        content = RecordDict({"arrays": ArrayRecord([u.copy()]), "metrics": MetricRecord({"num-examples": ne})})
        out.append(Message(content=content, metadata=md))
    return out


def _new_style(strategy, U, num_examples=None):
    arrays, _ = strategy.aggregate_train(1, _replies(U, num_examples))
    return arrays.to_numpy_ndarrays()[0]


def _inputs():
    rng = np.random.default_rng(123)
    random = rng.standard_normal((11, 6)) * rng.uniform(0.5, 3.0, (11, 1))
    U, _ = planted(n_honest=10, d=6)
    return {"random": random, "planted": U}


@pytest.mark.parametrize("name", ["random", "planted"])
def test_flower_legacy_functions_agree(name):
    agg = _legacy()
    U = _inputs()[name]
    res = [([u], 1) for u in U]
    np.testing.assert_allclose(agg.aggregate_krum(res, 2, 0)[0], krum(U, 2).delta)
    np.testing.assert_allclose(agg.aggregate_krum(res, 2, 4)[0], krum(U, 2, multi_k=4).delta)
    np.testing.assert_allclose(agg.aggregate_median(res)[0], coordinate_median(U).delta)
    np.testing.assert_allclose(agg.aggregate_trimmed_avg(res, 0.2)[0], trimmed_mean(U, 0.2).delta)
    bul = agg.aggregate_bulyan(list(res), 2, agg.aggregate_krum, to_keep=0)[0]
    np.testing.assert_allclose(bul, iterated_bulyan(U, 2).delta)


@pytest.mark.parametrize("name", ["random", "planted"])
def test_flower_new_style_strategies_agree(name):
    from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum

    U = _inputs()[name]
    ne = np.arange(1, 12)
    np.testing.assert_allclose(_new_style(Krum(num_malicious_nodes=2), U), krum(U, 2).delta)
    # MultiKrum averages the selected updates weighted by "num-examples".
    mk = _new_style(MultiKrum(num_malicious_nodes=2, num_nodes_to_select=4), U, ne)
    np.testing.assert_allclose(mk, krum(U, 2, multi_k=4, weights=ne).delta)
    np.testing.assert_allclose(_new_style(FedMedian(), U), coordinate_median(U).delta)
    np.testing.assert_allclose(_new_style(FedTrimmedAvg(beta=0.2), U), trimmed_mean(U, 0.2).delta)


def _one_shot_bulyan(U, f):
    """Bulyan with the theta lowest Krum scores of the FULL set (Flower's new-style Bulyan)."""
    n = U.shape[0]
    theta, beta = n - 2 * f, n - 4 * f
    scores = ref_krum_scores(U, f)
    sel = sorted(range(n), key=lambda i: scores[i])[:theta]
    S = U[sel]
    med = np.median(S, axis=0)
    idx = np.argsort(np.abs(S - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(S, idx, axis=0).mean(axis=0)


def test_flower_new_style_bulyan_uses_one_shot_selection(monkeypatch):
    """Documents a difference: flwr.serverapp.strategy.Bulyan (and flip_fl.defenses.bulyan with
    selection="one_shot") selects theta clients with a single Multi-Krum pass (scores of the full set),
    whereas the paper, Flower's legacy aggregate_bulyan, the reference iterated_bulyan and the production
    default (selection="iterated") re-run Krum on the remaining set after each pick."""
    import gc

    from flwr.serverapp.strategy import Bulyan

    # Flower's Bulyan deserialises replies with keep_input=False, which runs gc.collect() per array
    # (~0.1-0.5 s each): no garbage matters here, so skip it.
    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)
    U, honest_mean = planted(n_honest=10, d=6)
    np.testing.assert_allclose(_new_style(Bulyan(num_malicious_nodes=2), U), iterated_bulyan(U, 2).delta)
    np.testing.assert_allclose(bulyan(U, 2).delta, iterated_bulyan(U, 2).delta)
    differs = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((11, 6)) * rng.uniform(0.5, 3.0, (11, 1))
        flower = _new_style(Bulyan(num_malicious_nodes=2), X)
        np.testing.assert_allclose(flower, _one_shot_bulyan(X, 2))
        np.testing.assert_allclose(bulyan(X, 2, "one_shot").delta, flower, rtol=1e-6)
        selected = bulyan(X, 2, "one_shot").kept
        assert selected.sum() == 7 and set(np.flatnonzero(selected)) == set(np.argsort(ref_krum_scores(X, 2))[:7])
        np.testing.assert_allclose(bulyan(X, 2).delta, iterated_bulyan(X, 2).delta, rtol=1e-12)
        differs += not np.allclose(flower, iterated_bulyan(X, 2).delta)
    assert differs > 0
