"""FLARE (`strategies/flare.py`, `flip_fl.defenses.flare`): MMD between the local models' penultimate-layer
representations, nearest-neighbour votes, softmax trust; the numpy rule against the authors' MMD^2_u and by hand,
and the strategy with real local models on its held-out server images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import pairwise_kernels

from flip_fl.config import ConfigError
from flip_fl.data import load_datasets
from flip_fl.defenses.flare import flare, neighbor_counts, num_neighbors, pairwise_mmd, trust_scores
from flip_fl.defenses.fltrust import root_split
from flip_fl.models import build_model
from strategies import build_strategy, evaluation_set
from strategies.flare import penultimate_representations
from tests.defenses.rounds import (
    BAD,
    NODE,
    N,
    P,
    aggregate,
    assert_update,
    make_global,
    make_updates,
    strategy,
    with_statistics,
)
from tests.defenses.rounds import config as round_config
from tests.tiny import tiny_config

# --------------------------------------------------------------------------- reference


def ref_mmd2u(X: np.ndarray, Y: np.ndarray) -> float:
    """The authors' `kernel_mmd` (utils/mmd.py): MMD^2_u with scikit-learn's RBF kernel (gamma = 1 / features)."""
    m, n = len(X), len(Y)
    K = pairwise_kernels(np.vstack([X, Y]), metric="rbf")
    Kx, Ky, Kxy = K[:m, :m], K[m:, m:], K[:m, m:]
    return ((Kx.sum() - Kx.diagonal().sum()) / (m * (m - 1)) + (Ky.sum() - Ky.diagonal().sum()) / (n * (n - 1))
            - 2.0 * Kxy.sum() / (m * n))


# --------------------------------------------------------------------------- numpy rule


def test_mmd_is_the_authors_unbiased_statistic():
    rng = np.random.default_rng(0)
    sets = [rng.standard_normal((6, 3)), 0.5 + rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) * 2]
    mmd, gamma, usable = pairwise_mmd(sets)
    assert gamma == pytest.approx(1 / 3) and usable.all() and np.all(np.diag(mmd) == 0)
    for i in range(3):
        for j in range(3):
            if i != j:
                assert mmd[i, j] == pytest.approx(max(0.0, ref_mmd2u(sets[i], sets[j])), abs=1e-12)
    np.testing.assert_array_equal(mmd, mmd.T)
    with pytest.raises(ValueError, match="m >= 2"):
        pairwise_mmd([np.ones((1, 3)), np.ones((2, 3))])


def test_votes_and_trust_of_three_clients_by_hand():
    """n = 3: each client votes for max(1, 3 // 2 - 1) = 1 nearest other. MMD: 0-1 = 0.1, 0-2 = 0.5, 1-2 = 0.4.
    Votes: 0 -> 1, 1 -> 0, 2 -> 1; counts (1, 2, 0), mean 1; trust exp(c) / (e + e^2 + 1)."""
    mmd = np.array([[0.0, 0.1, 0.5], [0.1, 0.0, 0.4], [0.5, 0.4, 0.0]])
    counts, k = neighbor_counts(mmd, np.ones(3, dtype=bool))
    assert k == 1 and counts.tolist() == [1, 2, 0]
    total = math.e + math.e ** 2 + 1
    np.testing.assert_allclose(trust_scores(counts), [math.e / total, math.e ** 2 / total, 1 / total])
    np.testing.assert_allclose(trust_scores(counts, tau=2.0), np.exp(np.array([0.5, 1.0, 0.0])) /
                               np.exp(np.array([0.5, 1.0, 0.0])).sum())
    assert trust_scores([0, 0, 0]).tolist() == [1 / 3] * 3
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        trust_scores(counts, tau=0.0)


def test_number_of_neighbours_follows_the_authors_slice():
    # the authors' `argsort(mmd)[:, 1:int(0.5 * n)]`: floor(n / 2) - 1 others, at least one here
    assert [num_neighbors(n) for n in (1, 2, 3, 4, 5, 6, 10, 11)] == [0, 1, 1, 1, 1, 2, 4, 4]


def planted_sets(n: int = 10, m: int = 8, f: int = 5, seed: int = 0) -> list[np.ndarray]:
    """n - 1 representation sets from one distribution and a last one shifted far away."""
    rng = np.random.default_rng(seed)
    sets = [rng.standard_normal((m, f)) for _ in range(n - 1)]
    return [*sets, 3.0 + rng.standard_normal((m, f))]


def test_flare_gives_a_planted_outlier_the_least_trust_but_not_zero():
    sets = planted_sets()
    U = np.vstack([np.ones((9, 4)), -100.0 * np.ones((1, 4))])
    out = flare(U, sets)
    counts = out.arrays["counts"]
    assert counts[-1] == 0 and out.info["num_neighbors"] == 4 and counts.sum() == 10 * 4
    expected = np.exp(counts / counts.mean()) / np.exp(counts / counts.mean()).sum()
    np.testing.assert_allclose(out.weights, expected)
    np.testing.assert_allclose(out.delta, out.weights @ U)
    # soft trust (NOT_FILTERING in test_every_defense): the outlier keeps 1 / (1 + sum exp(c_i / mean c))
    assert out.weights[-1] == out.weights.min() and 0.02 < out.weights[-1] < 0.05
    assert out.kept.all()


def test_non_finite_representations_get_no_votes_and_cast_none():
    sets = planted_sets(n=6)[:5]
    sets[2] = np.full((8, 5), np.nan)
    out = flare(np.ones((5, 3)), sets)
    assert out.info["num_unusable"] == 1 and out.arrays["counts"][2] == 0
    assert np.isinf(out.arrays["mmd"][2, [0, 1, 3, 4]]).all() and out.arrays["counts"].sum() == 4 * 1
    assert np.isfinite(out.delta).all()
    huge = flare(np.ones((3, 2)), [np.full((2, 2), 1e300), np.zeros((2, 2)), np.ones((2, 2))])
    assert huge.info["num_unusable"] == 1 and np.isfinite(huge.weights).all()
    everyone = flare(np.ones((2, 2)), [np.full((2, 2), np.inf)] * 2)
    assert everyone.weights.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="one representation set per client"):
        flare(np.ones((3, 2)), sets)


# --------------------------------------------------------------------------- strategy


def test_flare_round_on_the_harness_uses_the_clients_whole_models(monkeypatch):
    """The rule rebuilds the local models from the whole replies (BatchNorm statistics included); with the
    representations standing in (the harness's model is not runnable), the aggregate is the trust-weighted sum."""
    strat = strategy("flare")
    seen: list[np.ndarray] = []

    def stand_in(U: np.ndarray) -> list[np.ndarray]:
        seen.append(U)
        return [np.outer(np.arange(1.0, 5.0), u[P]) for u in U]

    monkeypatch.setattr(strat, "representations", stand_in)
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strat, g, ups)
    np.testing.assert_array_equal(seen[0], U)  # statistics columns included, as each client sent them
    ref = flare(U[:, P], stand_in(U), 1.0)
    np.testing.assert_allclose(extra["defense_weights"], ref.weights, atol=1e-6)
    assert extra["defense_weights"][BAD] == min(extra["defense_weights"])
    assert "defense_kept" not in extra and "detection_recall" not in extra  # soft: no rejections
    assert_update(new, g, with_statistics(U, ref.delta, ref.weights), atol=1e-5)
    with pytest.raises(ValueError, match="rebuilds the local models from the replies"):
        strat.rule(type("R", (), {"matrix": U[:, P], "__len__": lambda self: N})())


def test_flare_reads_the_penultimate_layer_of_real_local_models():
    cfg = tiny_config("defense.name=flare", "defense.flare.root_size=40")
    strat = build_strategy(cfg, {NODE + i: i for i in range(6)}, {})
    test = load_datasets(cfg)[1]
    model = build_model(cfg.model, test)
    strat.global_state = {k: v.numpy() for k, v in model.state_dict().items()}
    D = sum(v.size for v in strat.global_state.values())
    rng = np.random.default_rng(0)
    updates = np.vstack([np.zeros(D), 0.01 * rng.standard_normal(D)])
    reps = strat.representations(updates)
    assert len(reps) == 2 and reps[0].shape == (40, 64)  # tiny_cnn: fc2's input is fc1's 64 ReLU outputs
    root = test.subset(root_split(cfg.seed, 40, len(test))[0])
    np.testing.assert_allclose(reps[0], penultimate_representations(model, root, torch.device("cpu"), 7), atol=1e-6)
    fc1 = model[1].fc1
    with torch.no_grad():
        x = root.batch(np.arange(40))[0]
        net = model[1]
        h = torch.nn.functional.max_pool2d(torch.relu(net.conv1(model[0](x))), 2)
        h = torch.nn.functional.max_pool2d(torch.relu(net.conv2(h)), 2)
        np.testing.assert_allclose(reps[0], torch.relu(fc1(h.flatten(1))).double().numpy(), atol=1e-5)
    assert not np.allclose(reps[0], reps[1]) and np.all(reps[1] >= 0)
    np.testing.assert_array_equal(reps[1], strat.representations(updates)[1])  # deterministic


def test_flare_server_images_are_held_out_of_evaluation():
    cfg = tiny_config("defense.name=flare", "defense.flare.root_size=50")
    test = load_datasets(cfg)[1]
    assert len(evaluation_set(cfg, test)) == 250
    np.testing.assert_array_equal(build_strategy(cfg, {NODE + i: i for i in range(6)}, {}).root.labels,
                                  test.labels[root_split(cfg.seed, 50, 300)[0]])


def test_impossible_flare_settings_are_config_errors():
    with pytest.raises(ConfigError, match="defense.flare.root_size: 300 server images cannot be held out of "
                                          "data.synthetic.test_size = 300"):
        round_config("flare", "defense.flare.root_size=300")
    with pytest.raises(ConfigError, match="defense.flare.root_size: 1 is out of range"):
        round_config("flare", "defense.flare.root_size=1")
    with pytest.raises(ConfigError, match="defense.flare.tau: 0.0 is out of range"):
        round_config("flare", "defense.flare.tau=0")
