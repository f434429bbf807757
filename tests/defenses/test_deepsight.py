"""DeepSight (`strategies/deepsight.py`, `flip_fl.defenses.deepsight`): NEUPs, threshold exceedings and the
classification boundary by hand, the cluster bookkeeping, DDifs against a numpy reference on the same random
inputs, the rule on hand-built updates, and the strategy with the real tiny CNN (full-network DDifs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flip_fl.config import ConfigError
from flip_fl.defenses.deepsight import (
    LOG_RATIO_BOUND,
    accepted_by_cluster,
    cluster_distances,
    deepsight,
    division_differences,
    ensemble_clusters,
    neups,
    output_layer,
    suspicious_labels,
    threshold_exceedings,
)
from strategies.defense import RoundUpdates
from tests.defenses.rounds import BAD, N, aggregate, applied_delta, make_global, make_updates, start_round, strategy
from tests.tiny import tiny_config

# --------------------------------------------------------------------------- labels, by hand


def test_neups_and_threshold_exceedings_by_hand():
    """ΔW = [[1, -1], [.5, 0], [0, 0]], Δb = [0, .5, .1]: energies 2, 1, .1; NEUP = (4, 1, .01) / 5.01.
    ξ = max(.01, 1/3) · 4/5.01, so only the first neuron exceeds it: TE = 1."""
    weights = np.array([[[1.0, -1.0], [0.5, 0.0], [0.0, 0.0]]])
    neup = neups(weights, np.array([[0.0, 0.5, 0.1]]))
    np.testing.assert_allclose(neup, [[4 / 5.01, 1 / 5.01, 0.01 / 5.01]])
    assert threshold_exceedings(neup).tolist() == [1]
    spread = neups(np.ones((1, 3, 2)), None)  # equal energies, no bias: every neuron exceeds 1/3 of the max
    np.testing.assert_allclose(spread, [[1 / 3] * 3])
    assert threshold_exceedings(spread).tolist() == [3]
    assert neups(np.zeros((1, 4, 2)), np.zeros((1, 4))).tolist() == [[0.25] * 4]  # no change: uniform


def test_threshold_floor_applies_beyond_100_classes():
    """ξ = max(0.01, 1/P) · max: with P = 200 the floor 0.01 (not 1/200) decides."""
    neup = np.full((1, 200), 0.002)  # above 1/200 · 0.3 = 0.0015 but below 0.01 · 0.3 = 0.003
    neup[0, 0] = 0.3
    assert threshold_exceedings(neup).tolist() == [1]


def test_classification_boundary_is_half_the_median_inclusive():
    assert suspicious_labels([10, 9, 10, 2, 8]).tolist() == [False, False, False, True, False]  # boundary 4.5
    assert suspicious_labels([4, 4, 2]).tolist() == [False, False, True]  # TE = boundary = 2 is suspicious
    assert not suspicious_labels([3, 3, 3]).any()


# --------------------------------------------------------------------------- clusters, by hand


def test_cluster_distances_treat_noise_as_singletons():
    dist = cluster_distances(np.array([0, 0, -1, 1, -1]))
    expected = np.ones((5, 5))
    expected[0, 1] = expected[1, 0] = 0.0
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_array_equal(dist, expected)


def test_clusters_are_accepted_below_tau():
    """Cluster 0 has 1/3 suspicious (not < 1/3: discarded), cluster 1 is all suspicious; noise points stand alone."""
    labels = np.array([0, 0, 0, 1, 1, -1, -1])
    suspicious = np.array([False, False, True, True, True, False, True])
    assert accepted_by_cluster(labels, suspicious, 1 / 3).tolist() == [False] * 5 + [True, False]
    assert accepted_by_cluster(labels, suspicious, 0.5).tolist() == [True] * 3 + [False] * 2 + [True, False]
    with pytest.raises(ValueError, match="tau"):
        accepted_by_cluster(labels, suspicious, 0.0)


def test_ensemble_clustering_separates_groups_all_metrics_agree_on():
    """Two groups of four, far apart in every metric: two final clusters, the merged distance 0 within a group
    and 1 across."""
    rng = np.random.default_rng(0)
    group = np.repeat([0, 1], 4)
    ddifs = np.stack([np.where(group[:, None] == 0, 1.0, 3.0) + 0.01 * rng.standard_normal((8, 3)) for _ in range(2)])
    neup = np.where(group[:, None] == 0, [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]) + 0.001 * rng.standard_normal((8, 3))
    cosine = np.where(group[:, None] == group[None, :], 0.0, 2.0)
    labels, merged = ensemble_clusters(ddifs, neup, cosine, min_cluster_size=2)
    assert len(set(labels[:4])) == 1 and len(set(labels[4:])) == 1 and labels[0] != labels[4] and labels.min() >= 0
    np.testing.assert_array_equal(merged, np.where(group[:, None] == group[None, :], 0.0, 1.0))


# --------------------------------------------------------------------------- the rule on hand-built updates

LAYER = output_layer({"hidden.weight": (2, 2), "out.weight": (3, 2), "out.bias": (3,)})
"""d = 4 + 6 + 3: the output layer is `out` (3 classes, fan-in 2)."""


def backdoor_round(seed: int = 0, bad: tuple[int, ...] = (9,)) -> tuple[np.ndarray, np.ndarray]:
    """Nine clean updates spreading output-layer energy over the 3 classes, attackers concentrating it on class 2;
    (U, DDifs with the attackers' class-2 ratio up)."""
    rng = np.random.default_rng(seed)
    n = 10
    U = np.empty((n, 13))
    ddifs = 1.0 + 0.01 * rng.standard_normal((3, n, 3))
    for i in range(n):
        U[i, :4] = 0.1 * rng.standard_normal(4)
        if i in bad:
            U[i, 4:10] = [0.01, 0.0, 0.0, 0.01, 0.9, 0.8]  # rows: class 0, 1, 2
            U[i, 10:] = [0.0, 0.01, 1.0]
            ddifs[:, i, 2] += 2.0
        else:
            U[i, 4:10] = 0.5 + 0.05 * rng.standard_normal(6)
            U[i, 10:] = 0.2 + 0.02 * rng.standard_normal(3)
    return U, ddifs


def test_output_layer_is_the_last_weight_and_bias():
    assert LAYER.weight_key == "out.weight" and LAYER.bias_key == "out.bias" and LAYER.num_outputs == 3
    assert (LAYER.weight, LAYER.bias) == (slice(4, 10), slice(10, 13))
    no_bias = output_layer({"a.weight": (4, 2), "out.weight": (3, 4)})
    assert no_bias.bias is None and no_bias.bias_key is None and no_bias.weight == slice(8, 20)
    with pytest.raises(ValueError, match="output layer"):
        output_layer({"out.scale": (3,)})


def test_a_backdoor_like_outlier_is_removed_and_clean_updates_pass():
    U, ddifs = backdoor_round()
    out = deepsight(U, ddifs, LAYER)
    assert out.arrays["suspicious"].tolist() == [False] * 9 + [True]
    assert out.kept.tolist() == [True] * 9 + [False] and out.info["accepted"] == 9
    norms = np.linalg.norm(U, axis=1)
    s = float(np.median(norms))
    expected = sum(min(1.0, s / norms[i]) * U[i] for i in range(9)) / 9  # the paper's clipped mean
    np.testing.assert_allclose(out.delta, expected)
    assert out.info["clip_norm"] == pytest.approx(s)
    np.testing.assert_allclose(out.weights, [1 / 9] * 9 + [0.0])


def test_colluding_suspicious_updates_are_discarded_as_a_cluster():
    U, ddifs = backdoor_round(seed=1, bad=(7, 8, 9))
    out = deepsight(U, ddifs, LAYER)
    assert out.arrays["suspicious"].tolist() == [False] * 7 + [True] * 3
    labels = out.arrays["labels"]
    assert labels[7] >= 0 and (labels[7:] == labels[7]).all() and labels[7] not in labels[:7]  # one cluster
    assert out.kept.tolist() == [True] * 7 + [False] * 3


def test_nothing_accepted_keeps_the_global_model(monkeypatch):
    """One cluster holding every model, one of three suspicious: its share 1/3 is not below tau, nothing is
    accepted and the aggregate is zero; with tau = 1/2 the whole cluster (the suspicious model too) is kept."""
    U, ddifs = backdoor_round(bad=(2,))
    U, ddifs = U[:3], ddifs[:, :3]
    monkeypatch.setattr("flip_fl.defenses.deepsight.ensemble_clusters", lambda *a: (np.zeros(3, int), None))
    out = deepsight(U, ddifs, LAYER)
    assert out.arrays["suspicious"].tolist() == [False, False, True]
    assert not out.kept.any() and out.info["accepted"] == 0
    np.testing.assert_array_equal(out.delta, np.zeros(13))
    np.testing.assert_array_equal(out.weights, np.zeros(3))
    assert deepsight(U, ddifs, LAYER, tau=0.5).kept.all()


def test_rule_input_checks():
    U, ddifs = backdoor_round()
    with pytest.raises(ValueError, match="ddifs"):
        deepsight(U, ddifs[:, :5], LAYER)
    with pytest.raises(ValueError, match="tau"):
        deepsight(U, ddifs, LAYER, tau=1.5)


# --------------------------------------------------------------------------- DDifs (torch)


def linear_logits(weights: list[np.ndarray], reference: np.ndarray):
    """logits(i, x) = x W_i^T (the global model: `reference`)."""
    def logits(i, x):
        w = reference if i is None else weights[i]
        return x.double() @ torch.from_numpy(w).T
    return logits


def test_division_differences_match_a_numpy_reference_on_the_same_inputs():
    """DDif_ip = mean_x softmax(x W_i)_p / softmax(x G)_p over the seed's inputs, drawn again here from the same
    generator state, in batches; a model equal to the global one has DDifs of exactly 1."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((4, 3))
    Ws = [G, G + 0.5 * rng.standard_normal((4, 3))]
    gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    states = [g.get_state() for g in gens]
    out = division_differences(linear_logits(Ws, G), 2, (3,), 50, gens, torch.device("cpu"), batch_size=16)
    assert out.shape == (2, 2, 4)
    for s, state in enumerate(states):
        gen = torch.Generator()
        gen.set_state(state)
        x = torch.cat([torch.rand((b, 3), generator=gen) for b in (16, 16, 16, 2)]).double().numpy()

        def softmax(z):
            e = np.exp(z - z.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)

        for i, W in enumerate(Ws):
            np.testing.assert_allclose(out[s, i], (softmax(x @ W.T) / softmax(x @ G.T)).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(out[:, 0], 1.0, rtol=1e-12)
    assert not np.allclose(out[0, 1], out[1, 1])  # the seeds draw different inputs


def test_hostile_logits_give_finite_ddifs():
    """Logits that overflow give log-ratios clamped to ±LOG_RATIO_BOUND (NaN counts as +bound): model 0's
    [inf, 0, 0] has a NaN log-softmax, ratios e^50; model 1's [0, 1e6, 0] against the global [0, 0, 0] has
    [e^-50, 3, e^-50]."""
    def logits(i, x):
        z = torch.zeros((x.shape[0], 3), dtype=torch.float64)
        if i == 0:
            z[:, 0] = float("inf")
        if i == 1:
            z[:, 1] = 1e6
        return z

    out = division_differences(logits, 2, (2,), 10, [torch.Generator().manual_seed(0)], torch.device("cpu"))
    big, small = np.exp(LOG_RATIO_BOUND), np.exp(-LOG_RATIO_BOUND)
    np.testing.assert_allclose(out[0], [[big, big, big], [small, 3.0, small]], rtol=1e-12)


# --------------------------------------------------------------------------- the strategy


def tiny_cnn_round(bad: tuple[int, ...], seed: int = 0, n: int = N):
    """A strategy with the real tiny CNN (64 random inputs, 2 seeds), its global model and updates: small
    random changes everywhere; the attackers' output layer moves towards class 7 only."""
    strat = strategy("deepsight", "defense.deepsight.num_samples=64", "defense.deepsight.num_seeds=2", n=n, bad=bad)
    g = {k: v.numpy() for k, v in strat.model_fn().state_dict().items()}
    rng = np.random.default_rng(seed)
    updates = []
    for i in range(n):
        u = {k: 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in g.items()}
        if i in bad:
            u["1.fc2.weight"] *= 0.1
            u["1.fc2.bias"] *= 0.1
            u["1.fc2.weight"][7] += 0.05
            u["1.fc2.bias"][7] += 0.3
        updates.append(u)
    return strat, g, updates


def test_the_strategy_runs_the_real_network_and_rejects_the_backdoor():
    strat, g, ups = tiny_cnn_round(bad=(BAD,))
    new, U, extra = aggregate(strat, g, ups)
    assert extra["defense_ddif_full_network"] is True
    assert extra["defense_rejected"] == [BAD] and extra["detection_recall"] == 1.0
    assert extra["defense_suspicious"] == 1 and extra["defense_accepted"] == N - 1
    kept = np.array([i != BAD for i in range(N)])
    norms = np.linalg.norm(U, axis=1)  # the tiny CNN has no BatchNorm: every entry is a trained parameter
    scale = np.minimum(1.0, np.median(norms) / norms)
    np.testing.assert_allclose(applied_delta(new, g), (kept * scale / kept.sum()) @ U, atol=1e-6)


def test_the_local_models_are_the_global_state_plus_each_update():
    """The strategy's local model i is G + u_i: a zero update has DDifs of exactly 1 on the real network, and the
    DDifs repeat for the same seed and round but not for another round."""
    strat, g, ups = tiny_cnn_round(bad=())
    ups[0] = {k: np.zeros_like(v) for k, v in ups[0].items()}
    start_round(strat, g)
    U = np.stack([np.concatenate([np.ravel(u[k]).astype(np.float64) for k in g]) for u in ups])
    layer = output_layer(strat.trained_shapes())
    first, full = strat.division_differences(RoundUpdates(1, U, np.ones(N), tuple(range(N))), layer)
    again, _ = strat.division_differences(RoundUpdates(1, U, np.ones(N), tuple(range(N))), layer)
    other, _ = strat.division_differences(RoundUpdates(2, U, np.ones(N), tuple(range(N))), layer)
    assert full and first.shape == (2, N, 10)
    np.testing.assert_allclose(first[:, 0], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first[:, 1:], other[:, 1:])


def test_hand_built_models_use_the_output_layer_alone():
    """The 6-entry models of the test harness are not the tiny CNN: the DDifs come from the output layer
    (`defense_ddif_full_network` false) and every client is decided."""
    _, _, extra = aggregate(strategy("deepsight"), make_global(), make_updates())
    assert extra["defense_ddif_full_network"] is False
    assert sorted(extra["defense_kept"] + extra["defense_rejected"]) == list(range(N))


def test_min_cluster_size_must_fit_a_round():
    with pytest.raises(ConfigError, match=r"defense.deepsight.min_cluster_size: 5 exceeds "
                                          r"federation.clients_per_round \(4\)"):
        tiny_config("defense.name=deepsight", "defense.deepsight.min_cluster_size=5")
    with pytest.raises(ConfigError, match="defense.deepsight.tau"):
        tiny_config("defense.name=deepsight", "defense.deepsight.tau=0")
