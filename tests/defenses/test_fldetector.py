"""FLDetector (`strategies/fldetector.py`, `flip_fl.defenses.fldetector`): the L-BFGS Hessian-vector product against
an explicit quadratic's Hessian and the recursive BFGS updates, exact 1-D k-means against brute force, the gap
statistic, the round on a simulated quadratic federation (attackers flagged and excluded for good, exact
predictions), bounded histories, and the strategy's state across a checkpoint."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from flip_fl.defenses.fldetector import (
    STATE_KEYS,
    FLDetectorState,
    flag_high_cluster,
    fldetector_round,
    gap_statistic_clusters,
    kmeans_1d,
    lbfgs_hvp,
    normalised_distances,
)
from flip_fl.defenses.median import coordinate_median
from tests.defenses.rounds import EXAMPLES, N, P, aggregate, make_global, make_updates, strategy

# --------------------------------------------------------------------------- L-BFGS


def quadratic(d: int = 6, seed: int = 0) -> np.ndarray:
    """The Hessian A of f(w) = w^T A w / 2 (symmetric, eigenvalues in [0.5, 2])."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return Q @ np.diag(rng.uniform(0.5, 2.0, d)) @ Q.T


def test_lbfgs_equals_the_recursive_bfgs_updates():
    """The compact form is the matrix m BFGS updates of sigma I make: B+ = B - B s s^T B / s^T B s + y y^T / y^T s,
    on gradient differences y = A s of a quadratic."""
    A = quadratic()
    rng = np.random.default_rng(1)
    S = rng.standard_normal((4, 6))
    Y = S @ A.T
    B = (Y[-1] @ S[-1]) / (S[-1] @ S[-1]) * np.eye(6)
    for s, y in zip(S, Y):
        Bs = B @ s
        B = B - np.outer(Bs, Bs) / (s @ Bs) + np.outer(y, y) / (y @ s)
    for v in rng.standard_normal((3, 6)):
        np.testing.assert_allclose(lbfgs_hvp(S, Y, v), B @ v, atol=1e-12)
    np.testing.assert_allclose(lbfgs_hvp(S, Y, S[-1]), Y[-1], atol=1e-12)  # the secant condition


def test_lbfgs_recovers_a_quadratics_hessian_from_conjugate_steps():
    """With d A-conjugate steps, BFGS keeps every secant pair (hereditary property): B = A, so B v = A v."""
    A = quadratic(d=5, seed=2)
    rng = np.random.default_rng(3)
    steps: list[np.ndarray] = []
    for _ in range(5):
        x = rng.standard_normal(5)
        for q in steps:
            x = x - (x @ A @ q) / (q @ A @ q) * q
        steps.append(x)
    S = np.array(steps)
    for v in rng.standard_normal((4, 5)):
        np.testing.assert_allclose(lbfgs_hvp(S, S @ A.T, v), A @ v, atol=1e-10)


def test_lbfgs_in_one_dimension_and_with_update_signs():
    """In 1-D the secant slope is exact; with updates (-lr x gradients) the matrix is -B of the gradients'."""
    np.testing.assert_allclose(lbfgs_hvp([[2.0], [0.5]], [[6.0], [1.5]], np.array([4.0])), [12.0])
    A = quadratic()
    S = np.random.default_rng(4).standard_normal((3, 6))
    v = np.ones(6)
    np.testing.assert_allclose(lbfgs_hvp(S, -0.1 * S @ A.T, v), -0.1 * lbfgs_hvp(S, S @ A.T, v), atol=1e-12)
    with pytest.raises(ValueError, match="S and Y"):
        lbfgs_hvp(S, S[:2], v)


# --------------------------------------------------------------------------- k-means and the gap statistic


def brute_force_kmeans(x: np.ndarray, k: int) -> float:
    """The least within-cluster sum of squares over every assignment of the points to k labels."""
    best = np.inf
    for labels in itertools.product(range(k), repeat=len(x)):
        lab = np.array(labels)
        best = min(best, sum(((x[lab == c] - x[lab == c].mean()) ** 2).sum() for c in range(k) if (lab == c).any()))
    return best


@pytest.mark.parametrize("k", [1, 2, 3])
def test_kmeans_1d_is_exact(k):
    x = np.random.default_rng(k).standard_normal(7)
    labels, inertia = kmeans_1d(x, k)
    assert inertia == pytest.approx(brute_force_kmeans(x, k), abs=1e-12)
    assert inertia == pytest.approx(sum(((x[labels == c] - x[labels == c].mean()) ** 2).sum() for c in range(k)))
    order = np.argsort(x)
    assert (np.diff(labels[order]) >= 0).all()  # clusters labelled in increasing order


def test_gap_statistic_and_the_high_cluster():
    rng = np.random.default_rng(0)
    clean = 1.0 + 0.01 * rng.standard_normal(27)
    assert gap_statistic_clusters(np.r_[clean, 5.0, 5.1, 5.2], np.random.default_rng(1)) >= 2
    assert gap_statistic_clusters(rng.standard_normal(30), np.random.default_rng(2)) == 1
    assert gap_statistic_clusters(np.ones(10), np.random.default_rng(3)) == 1  # identical scores
    assert gap_statistic_clusters(np.array([0.0, 9.0]), np.random.default_rng(4)) == 1  # too few to compare k
    assert flag_high_cluster(np.array([0.1, 0.12, 0.9, 0.11, 0.95])).tolist() == [False, False, True, False, True]


def test_normalised_distances_by_hand():
    """Distances 1, 2, 3 sum to 6: d / 6 x 3 clients = 0.5, 1, 1.5."""
    predicted = np.zeros((3, 2))
    received = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    np.testing.assert_allclose(normalised_distances(predicted, received), [0.5, 1.0, 1.5])
    np.testing.assert_array_equal(normalised_distances(received, received), np.zeros(3))


# --------------------------------------------------------------------------- the round on a quadratic federation


def federation(rounds: int, window: int = 5, n: int = 10, bad: tuple[int, ...] = (7, 8, 9), d: int = 20,
               seed: int = 0, aggregation: str = "median", sampled=None, state: FLDetectorState | None = None):
    """Clients of a quadratic loss: benign update -0.1 A (w - c_i) + SGD noise 1e-3, attackers a Gaussian of the
    same norm each round (the authors' Gaussian attack); w += the round's aggregate. (outcomes, state)."""
    rng = np.random.default_rng(seed)
    A = quadratic(d, seed)
    centres = rng.standard_normal(d) + 0.3 * rng.standard_normal((n, d))
    w = np.zeros(d)
    state = state or FLDetectorState(window)
    outcomes = []
    for t in range(1, rounds + 1):
        clients = list(range(n)) if sampled is None else sampled(t)
        U = np.stack([-0.1 * A @ (w - centres[i]) + 1e-3 * rng.standard_normal(d) for i in clients])
        for row, i in enumerate(clients):
            if i in bad:
                U[row] = rng.standard_normal(d) * np.linalg.norm(U[0]) / np.sqrt(d)
        out = fldetector_round(state, t, w, U, clients, np.random.default_rng([seed, t]), aggregation)
        outcomes.append((clients, U, out))
        w = w + out.delta
    return outcomes, state


def test_attackers_are_flagged_once_the_window_is_full_and_excluded_for_good():
    outcomes, state = federation(rounds=12, window=5)
    for t, (_, U, out) in enumerate(outcomes, 1):
        if t < 7:  # the Hessian window (N = 5 pairs) is full from round N + 2
            assert not out.info["detection"] and out.kept.all(), t
            np.testing.assert_allclose(out.delta, coordinate_median(U).delta)
        else:
            assert out.kept.tolist() == [True] * 7 + [False] * 3, t
            assert (out.weights[7:] == 0).all() and out.weights.sum() == pytest.approx(1.0)
            np.testing.assert_allclose(out.delta, coordinate_median(U[:7]).delta)
        assert out.info["predicted"] == (0 if t < 3 else 10 if t <= 7 else 7), t
    assert outcomes[6][2].info["flagged"] == 3 and state.excluded == {7, 8, 9}
    assert not any(out.info["detection"] for _, _, out in outcomes[7:])  # detection stops at the first flag
    scores = outcomes[6][2].arrays["scores"]
    assert scores[7:].min() > 5 * scores[:7].max()


def test_a_benign_federation_loses_nobody():
    """30 benign clients: the test runs and finds one group (false alarms of the gap statistic are rare at this
    size, about one in six at 10 clients; this seeded run has none)."""
    outcomes, state = federation(rounds=10, window=3, n=30, bad=())
    assert any(out.info["detection"] for _, _, out in outcomes)
    assert state.excluded == set() and all(out.kept.all() for _, _, out in outcomes)


def test_predictions_are_exact_for_a_linear_federation_even_from_older_rounds():
    """1-D clients u_i(w) = -0.5 (w - c_i): the secant slope is the Hessian, so every benign prediction is exact,
    also for a client last seen two rounds ago (w_t - w_tau spans two steps); the inconsistent client gets all
    of the normalised distance (the mean weights clients 0 and 1 only, so the global update is the same linear
    function of w in every round)."""
    state = FLDetectorState(window=4)
    centres = np.array([1.0, 2.0, 3.0, 4.0])
    w, rng = np.zeros(1), np.random.default_rng(0)
    plan = {1: [0, 1, 2, 3], 2: [0, 1, 3], 3: [0, 1, 2, 3], 4: [0, 1, 2, 3]}
    for t, clients in plan.items():
        U = np.array([[-0.5 * (w[0] - centres[i])] for i in clients])
        U[clients.index(3)] = rng.standard_normal(1) * 3  # client 3 is inconsistent
        weights = [1.0 if c in (0, 1) else 0.0 for c in clients]
        out = fldetector_round(state, t, w, U, clients, rng, "mean", weights)
        w = w + out.delta
        if t == 3:  # client 2 is predicted from round 1
            np.testing.assert_allclose(out.arrays["distances"], [0.0, 0.0, 0.0, 4.0], atol=1e-6)
    assert state.last_round[2] == 4 and out.info["predicted"] == 4
    np.testing.assert_allclose(out.arrays["distances"], [0.0, 0.0, 0.0, 4.0], atol=1e-6)


def test_histories_stay_bounded_by_the_window():
    """Global history: N + 1 rounds; distances: the last N rounds; a client's last update only while its round is
    in the history (client 9 takes part in round 1 only)."""
    sampled = lambda t: list(range(9)) + ([9] if t == 1 else [])  # noqa: E731
    _, state = federation(rounds=15, window=3, bad=(), sampled=sampled)
    assert state.rounds == [12, 13, 14, 15] and len(state.models) == len(state.aggregates) == 4
    assert all(min(r) > 12 and len(r) <= 3 for r in state.distances.values())
    assert 9 not in state.last_update and 9 not in state.distances and set(state.last_update) == set(range(9))


def test_partial_participation_flags_attackers_scored_in_earlier_rounds():
    """Half the clients each round: detection clusters every client with a score in the window, so attackers
    not sampled in the detection round are excluded too and rejected when they come back."""
    sampled = lambda t: list(range(0, 10, 2)) if t % 2 else list(range(1, 10, 2))  # noqa: E731
    outcomes, state = federation(rounds=14, window=4, bad=(6, 9), sampled=sampled)
    assert state.excluded == {6, 9}
    for clients, _, out in outcomes[-2:]:
        assert [c for c, k in zip(clients, out.kept) if not k] == [c for c in clients if c in (6, 9)]


def test_the_mean_aggregation_weights_the_kept_clients():
    state = FLDetectorState(window=2)
    state.excluded = {1}
    U = np.array([[1.0, 0.0], [100.0, 100.0], [0.0, 3.0]])
    out = fldetector_round(state, 1, np.zeros(2), U, [0, 1, 2], np.random.default_rng(0), "mean", [1.0, 5.0, 3.0])
    np.testing.assert_allclose(out.weights, [0.25, 0.0, 0.75])
    np.testing.assert_allclose(out.delta, [0.25, 2.25])
    assert out.kept.tolist() == [True, False, True] and 1 not in state.last_update


def test_state_arrays_round_trip():
    _, state = federation(rounds=9, window=3)
    arrays = state.state_dict()
    assert set(arrays) == set(STATE_KEYS) and all(isinstance(v, np.ndarray) for v in arrays.values())
    again = FLDetectorState.from_state_dict(3, arrays).state_dict()
    assert all(np.array_equal(arrays[k], again[k]) and arrays[k].dtype == again[k].dtype for k in arrays)


# --------------------------------------------------------------------------- the strategy


def as_update(row: np.ndarray, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A flat trained-parameter update (P coordinates) as an update dict of the harness model."""
    full = np.zeros(P.size)
    full[P] = row
    out, pos = {}, 0
    for k, v in g.items():
        out[k] = full[pos:pos + v.size].reshape(v.shape)
        pos += v.size
    out["bn.num_batches_tracked"] = np.array(5)
    return out


def strategy_rounds(strat, g, rounds, seed=0, bad=(3,)):
    """Rounds of the harness model whose clients follow a quadratic loss on the trained parameters; attackers
    send Gaussian updates. Returns the global model and each round's metrics."""
    d = int(P.sum())
    A, rng = quadratic(d, seed), np.random.default_rng(seed)
    centres = rng.standard_normal(d) + 0.3 * rng.standard_normal((N, d))
    extras = []
    for t in rounds:
        w = np.concatenate([np.ravel(g[k]) for k in g])[P].astype(np.float64)
        rows = [-0.1 * A @ (w - centres[i]) + 1e-3 * rng.standard_normal(d) for i in range(N)]
        for i in bad:
            rows[i] = rng.standard_normal(d) * np.linalg.norm(rows[0]) / np.sqrt(d)
        g, _, extra = aggregate(strat, g, [as_update(r, g) for r in rows], server_round=t, attacking=bad)
        extras.append(extra)
    return g, extras


def test_the_strategy_excludes_the_attacker_and_survives_a_checkpoint():
    """A run restored from a checkpoint after round 3 takes the same decisions (detection in round 4) and reaches
    the same models as the uninterrupted run, and ends with the same state."""
    a = strategy("fldetector", "defense.fldetector.window=2")
    g, first = strategy_rounds(a, make_global(), range(1, 4))
    assert all(e["defense_rejected"] == [] and e["defense_detection"] is False for e in first)
    b = strategy("fldetector", "defense.fldetector.window=2")
    b.load_state_dict({k: np.array(v) for k, v in a.state_dict().items()})
    (g_a, later_a), (g_b, later_b) = (strategy_rounds(s, g, range(4, 9), seed=1) for s in (a, b))
    assert all(np.array_equal(g_a[k], g_b[k]) for k in g_a)
    for ea, eb in zip(later_a, later_b):
        for key in ("defense_kept", "defense_rejected", "defense_weights", "defense_flagged", "defense_predicted"):
            assert ea[key] == eb[key], key
    assert later_a[0]["defense_flagged"] == 1 and later_a[0]["detection_recall"] == 1.0
    assert all(e["defense_rejected"] == [3] and e["defense_weights"][3] == 0.0 for e in later_a)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert sa["fldetector/excluded"].tolist() == [3] and sa["fldetector/rounds"].tolist() == [6, 7, 8]


def test_the_first_rounds_decide_with_the_median_alone():
    _, U, extra = aggregate(strategy("fldetector"), make_global(), make_updates())
    assert extra["defense_kept"] == list(range(N)) and extra["defense_detection"] is False
    shares = coordinate_median(U[:, P]).weights
    np.testing.assert_allclose(extra["defense_weights"], np.round(shares, 6))
    mean = strategy("fldetector", "defense.fldetector.aggregation=mean")
    extra = aggregate(mean, make_global(), make_updates())[2]
    np.testing.assert_allclose(extra["defense_weights"], np.round(np.array(EXAMPLES) / sum(EXAMPLES), 6))


def test_foreign_or_partial_state_is_refused():
    s = strategy("fldetector")
    with pytest.raises(ValueError, match="unexpected entries"):
        s.load_state_dict({"history/1": np.ones(2)})
    with pytest.raises(ValueError, match="lacks"):
        s.load_state_dict({"fldetector/rounds": np.zeros(0, np.int64)})
