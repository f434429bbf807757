"""FLDetector (Zhang et al., KDD 2022): flag clients whose updates are inconsistent with their own history.

Each round t, with w_t the global model (trained parameters) and u_t^i client i's update:

1. **Hessian**: the L-BFGS approximation H_t from the last N pairs (s_k, y_k), s_k = w_k - w_{k-1} the
   global-model differences and y_k = g_k - g_{k-1} the differences of the global (aggregate) updates
   (`lbfgs_hvp`: the compact representation of Byrd, Nocedal & Schnabel, as the authors' `lbfgs`).
2. **Prediction** (Cauchy mean value theorem): û_t^i = u_τ^i + H_t (w_t - w_τ) from the client's last
   update u_τ^i (τ = t - 1 when it took part in the previous round, the paper's setting; an earlier round
   of the window under partial participation).
3. **Distances**: d_t^i = ||û_t^i - u_t^i||, normalised as d_t / ||d_t||_1 (`normalised_distances`, times
   the number of predicted clients, so rounds with different numbers of replies weigh alike).
4. **Suspicious score**: s_t^i = the mean of client i's normalised distances over the last N rounds.
5. **Detection**, once the Hessian window is full: the gap statistic on the scores of every client with one
   decides whether there is more than one group (`gap_statistic_clusters`); if so, k-means with k = 2 splits
   them and the cluster with the larger mean score is flagged (`flag_high_cluster`; 1-D k-means is solved
   exactly, `kmeans_1d`). The flagged clients are excluded from then on and detection stops, as the authors'
   code stops at its first detection (repeating the test every round would flag benign clients sooner or
   later: on 10 benign scores the gap statistic finds two groups one time in ten to one in six).

`FLDetectorState` keeps the bounded histories across rounds: the last N + 1 global models and global
updates (float32), each client's last update while it is within that window (float32) and its normalised
distances of the last N rounds, and the excluded clients. `state_dict()` / `from_state_dict()` hold them as
numpy arrays (checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, client_weights
from flip_fl.defenses.median import coordinate_median

GAP_MAX_CLUSTERS = 7
"""Largest k the gap statistic tries (the authors' code: k = 1..7)."""
GAP_REFERENCES = 10
"""Uniform reference draws per k (the authors' code: nrefs = 10)."""
GAP_FLOOR = 1e-12
"""Within-cluster dispersions below this count as this (a perfect clustering of the [0, 1]-scaled scores)."""
AGGREGATIONS = ("median", "mean")


# --------------------------------------------------------------------------- L-BFGS


def lbfgs_hvp(S: np.ndarray, Y: np.ndarray, v: np.ndarray) -> np.ndarray:
    """B v for the L-BFGS matrix B of the pairs (S[k], Y[k]), oldest first (compact representation).

    B = σI - [σS^T  Y^T]^T M^{-1} [σS^T; Y^T] with σ = y_m·s_m / s_m·s_m (last pair), M = [[σ S S^T, L],
    [L^T, -D]], L the strictly lower triangle of S Y^T and D its diagonal (rows of S, Y are the pairs): the
    matrix m BFGS updates of σI produce. A singular M is pseudo-inverted.
    """
    S, Y, v = (np.asarray(a, dtype=np.float64) for a in (S, Y, v))
    if S.ndim != 2 or S.shape != Y.shape or v.shape != (S.shape[1],) or S.shape[0] < 1:
        raise ValueError(f"S and Y must be (m >= 1, d) and v (d,); got {S.shape}, {Y.shape}, {v.shape}")
    sigma = float(Y[-1] @ S[-1]) / float(S[-1] @ S[-1])
    SY = S @ Y.T
    L = np.tril(SY, k=-1)
    M = np.block([[sigma * (S @ S.T), L], [L.T, -np.diag(np.diag(SY))]])
    p = np.concatenate([sigma * (S @ v), Y @ v])
    try:
        q = np.linalg.solve(M, p)
    except np.linalg.LinAlgError:
        q = np.linalg.pinv(M) @ p
    m = S.shape[0]
    return sigma * v - (sigma * (q[:m] @ S) + q[m:] @ Y)


def usable_pairs(S: np.ndarray, Y: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Pairs the L-BFGS matrix can use: |s·y| > tol |s| |y| (a zero step or a vanishing curvature is dropped)."""
    sy = np.abs(np.einsum("ij,ij->i", S, Y))
    return sy > tol * np.linalg.norm(S, axis=1) * np.linalg.norm(Y, axis=1)


# --------------------------------------------------------------------------- scores and detection


def normalised_distances(predicted: np.ndarray, received: np.ndarray) -> np.ndarray:
    """||û_i - u_i|| / sum_j ||û_j - u_j||, times the number of rows (zeros when every prediction is exact)."""
    d = np.linalg.norm(np.asarray(predicted, np.float64) - np.asarray(received, np.float64), axis=1)
    total = d.sum()
    return d * (len(d) / total) if total > 0 else np.zeros_like(d)


def kmeans_1d(x: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact k-means of 1-D data (dynamic programming over the sorted values): (labels, inertia).

    Clusters are contiguous in sorted order; label 0 is the lowest cluster. k larger than the number of points
    is cut to it.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=int), 0.0
    k = max(1, min(int(k), n))
    order = np.argsort(x, kind="stable")
    xs = x[order]
    c1 = np.concatenate([[0.0], np.cumsum(xs)])
    c2 = np.concatenate([[0.0], np.cumsum(xs * xs)])
    j, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # segment xs[j..i]
    size = np.maximum(i - j + 1, 1)
    seg = c2[i + 1] - c2[j] - (c1[i + 1] - c1[j]) ** 2 / size
    cost = np.where(j <= i, np.maximum(seg, 0.0), np.inf)
    best = cost[0].copy()  # best[i]: one cluster on xs[0..i]
    starts = np.zeros((k, n), dtype=int)
    for c in range(1, k):
        prev = np.concatenate([[np.inf], best[:-1]])  # prev[j]: c clusters on xs[0..j-1]
        total = prev[:, None] + cost
        starts[c] = np.argmin(total, axis=0)
        best = total[starts[c], np.arange(n)]
    labels_sorted = np.empty(n, dtype=int)
    end = n - 1
    for c in range(k - 1, -1, -1):
        start = starts[c, end] if c > 0 else 0
        labels_sorted[start:end + 1] = c
        end = start - 1
    labels = np.empty(n, dtype=int)
    labels[order] = labels_sorted
    return labels, float(best[n - 1])


def gap_statistic_clusters(scores: np.ndarray, rng: np.random.Generator, max_clusters: int = GAP_MAX_CLUSTERS,
                           references: int = GAP_REFERENCES) -> int:
    """The number of clusters of `scores` by the gap statistic (as the authors' `detection1`).

    The scores are min-max scaled to [0, 1]; for k = 1..K (K = min(max_clusters, n - 1)),
    Gap(k) = log(mean_b W*_kb) - log(W_k), W the k-means inertia of the scores and W*_kb that of b-th draw of
    n uniform points; s_k = sqrt(1 + 1/B) std_b(log W*_kb). The answer is the smallest k with
    Gap(k) >= Gap(k+1) - s_{k+1}, else K. Identical scores, or fewer than 3, are one cluster.
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    n = len(x)
    top = min(max_clusters, n - 1)
    if top < 2 or np.ptp(x) == 0:
        return 1
    x = (x - x.min()) / np.ptp(x)
    gaps, sds = np.zeros(top + 1), np.zeros(top + 1)
    for k in range(1, top + 1):
        w = max(kmeans_1d(x, k)[1], GAP_FLOOR)
        ref = np.log([max(kmeans_1d(rng.uniform(0.0, 1.0, n), k)[1], GAP_FLOOR) for _ in range(references)])
        gaps[k] = np.log(np.mean(np.exp(ref))) - np.log(w)
        sds[k] = np.sqrt(1.0 + 1.0 / references) * np.std(ref)
    for k in range(1, top):
        if gaps[k] >= gaps[k + 1] - sds[k + 1]:
            return k
    return top


def flag_high_cluster(scores: np.ndarray) -> np.ndarray:
    """k-means with k = 2 on the scores: True on the cluster with the larger mean score."""
    labels, _ = kmeans_1d(scores, 2)
    return labels == 1  # exact 1-D k-means labels clusters in increasing order


# --------------------------------------------------------------------------- the state across rounds


@dataclass
class FLDetectorState:
    """What FLDetector carries from round to round (see the module docstring), bounded by the window N.

    Attributes:
        window: N.
        rounds: the rounds of the stored global models and updates (at most N + 1, increasing).
        models: their global models' trained parameters (float32, one row per stored round).
        aggregates: their global updates (float32).
        last_round: client -> the round of its stored update.
        last_update: client -> that update (float32).
        distances: client -> {round: normalised distance} over the last N rounds.
        excluded: the clients flagged so far (never aggregated again).
    """

    window: int
    rounds: list[int] = field(default_factory=list)
    models: list[np.ndarray] = field(default_factory=list)
    aggregates: list[np.ndarray] = field(default_factory=list)
    last_round: dict[int, int] = field(default_factory=dict)
    last_update: dict[int, np.ndarray] = field(default_factory=dict)
    distances: dict[int, dict[int, float]] = field(default_factory=dict)
    excluded: set[int] = field(default_factory=set)

    def hessian_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The usable (S, Y) pairs of consecutive stored rounds, oldest first (float64)."""
        if len(self.rounds) < 2:
            return np.zeros((0, 0)), np.zeros((0, 0))
        models = np.asarray(self.models, dtype=np.float64)
        aggregates = np.asarray(self.aggregates, dtype=np.float64)
        S, Y = np.diff(models, axis=0), np.diff(aggregates, axis=0)
        keep = usable_pairs(S, Y)
        return S[keep], Y[keep]

    def score(self, pid: int) -> float | None:
        """The client's suspicious score (mean normalised distance in the window), None without one."""
        values = self.distances.get(pid)
        return float(np.mean(list(values.values()))) if values else None

    def ready(self) -> bool:
        """Detection runs once the Hessian window is full: N pairs of stored rounds."""
        return len(self.rounds) >= self.window + 1

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state as numpy arrays."""
        d = self.models[0].shape[0] if self.models else 0
        pids = sorted(self.last_update)
        dist = [(pid, r, v) for pid in sorted(self.distances) for r, v in sorted(self.distances[pid].items())]
        return {
            "rounds": np.asarray(self.rounds, dtype=np.int64),
            "models": np.asarray(self.models, dtype=np.float32).reshape(len(self.rounds), d),
            "aggregates": np.asarray(self.aggregates, dtype=np.float32).reshape(len(self.rounds), d),
            "clients": np.asarray(pids, dtype=np.int64),
            "client_rounds": np.asarray([self.last_round[p] for p in pids], dtype=np.int64),
            "client_updates": (np.stack([self.last_update[p] for p in pids]) if pids
                               else np.zeros((0, d), dtype=np.float32)),
            "distance_clients": np.asarray([c for c, _, _ in dist], dtype=np.int64),
            "distance_rounds": np.asarray([r for _, r, _ in dist], dtype=np.int64),
            "distance_values": np.asarray([v for _, _, v in dist], dtype=np.float64),
            "excluded": np.asarray(sorted(self.excluded), dtype=np.int64),
        }

    @classmethod
    def from_state_dict(cls, window: int, state: Mapping[str, np.ndarray]) -> FLDetectorState:
        """The state of `state_dict()` arrays."""
        out = cls(window)
        out.rounds = [int(r) for r in state["rounds"]]
        out.models = [np.asarray(m, dtype=np.float32) for m in state["models"]]
        out.aggregates = [np.asarray(a, dtype=np.float32) for a in state["aggregates"]]
        for pid, r, u in zip(state["clients"], state["client_rounds"], state["client_updates"]):
            out.last_round[int(pid)] = int(r)
            out.last_update[int(pid)] = np.asarray(u, dtype=np.float32)
        for pid, r, v in zip(state["distance_clients"], state["distance_rounds"], state["distance_values"]):
            out.distances.setdefault(int(pid), {})[int(r)] = float(v)
        out.excluded = {int(p) for p in state["excluded"]}
        return out


STATE_KEYS = ("rounds", "models", "aggregates", "clients", "client_rounds", "client_updates", "distance_clients",
              "distance_rounds", "distance_values", "excluded")


def fldetector_round(state: FLDetectorState, server_round: int, model: np.ndarray, U: Any, clients: Sequence[int],
                     rng: np.random.Generator, aggregation: str = "median",
                     weights: Any = None) -> AggregationOutcome:
    """One round of FLDetector on the updates `U` (n, d) of `clients` at the global model `model` (d,).

    Predicts, scores and (once `state.ready()`) detects as in the module docstring, excludes the flagged
    clients from this round on, aggregates the others (`aggregation`: coordinate-wise median, or the mean
    with `weights`), and updates `state`. `rng` draws the gap statistic's references.

    `weights`: each client's coefficient (0 for excluded ones; median: the coordinate shares). `kept`: not
    excluded. arrays: `"scores"` (NaN without a score), `"distances"` (NaN without a prediction), `"flagged"`
    (flagged this round). info: `predicted`, `hessian_pairs`, `detection` (the test ran), `clusters` (the gap
    statistic's answer), `flagged` (clients flagged, this round's or not), `excluded` (all so far).
    """
    U = as_updates(U)
    n, d = U.shape
    model = np.asarray(model, dtype=np.float64).ravel()
    if model.shape != (d,) or len(clients) != n:
        raise ValueError(f"model must be ({d},) and clients {n} long; got {model.shape} and {len(clients)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")
    if state.models and state.models[0].shape != (d,):
        raise ValueError(f"the stored history has {state.models[0].shape[0]} parameters, the updates {d}")
    pids = [int(p) for p in clients]
    active = np.array([p not in state.excluded for p in pids], dtype=bool)
    predicted, distances, pairs = _predict_and_score(state, server_round, model, U, pids, active)
    scores = np.array([np.nan if (s := state.score(p)) is None else s for p in pids])
    detection, clusters, caught = _detect(state, rng)
    flagged = np.array([p in caught for p in pids], dtype=bool)
    kept = active & ~flagged
    delta, coefficients = _aggregate_kept(U, kept, aggregation, weights)
    _remember(state, server_round, model, U, pids, kept, delta)

    return AggregationOutcome(
        delta=delta,
        weights=coefficients,
        kept=kept,
        info={"predicted": len(predicted), "hessian_pairs": pairs, "detection": bool(detection),
              "clusters": int(clusters), "flagged": len(caught), "excluded": len(state.excluded)},
        arrays={"scores": scores, "distances": distances, "flagged": flagged},
    )


def _predict_and_score(state: FLDetectorState, server_round: int, model: np.ndarray, U: np.ndarray,
                       pids: list[int], active: np.ndarray) -> tuple[dict[int, np.ndarray], np.ndarray, int]:
    """Steps 1-4: the active clients' predicted updates and normalised distances, and the L-BFGS pairs used.

    The distances of the last N rounds stay in `state`.
    """
    S, Y = state.hessian_pairs()
    predicted: dict[int, np.ndarray] = {}
    if len(S):
        stored = {r: i for i, r in enumerate(state.rounds)}
        steps: dict[int, np.ndarray] = {}
        for i in np.flatnonzero(active):
            tau = state.last_round.get(pids[i])
            if tau is None or tau not in stored or tau >= server_round:
                continue
            if tau not in steps:
                steps[tau] = lbfgs_hvp(S, Y, model - state.models[stored[tau]].astype(np.float64))
            prediction = state.last_update[pids[i]].astype(np.float64) + steps[tau]
            if np.isfinite(prediction).all():
                predicted[int(i)] = prediction
    distances = np.full(len(pids), np.nan)
    if predicted:
        order = sorted(predicted)
        distances[order] = normalised_distances(np.stack([predicted[j] for j in order]), U[order])
        for j in order:
            state.distances.setdefault(pids[j], {})[server_round] = float(distances[j])
    for pid in list(state.distances):  # 4: the window of the last N rounds
        kept_rounds = {r: v for r, v in state.distances[pid].items() if r > server_round - state.window}
        if kept_rounds:
            state.distances[pid] = kept_rounds
        else:
            del state.distances[pid]
    return predicted, distances, int(len(S))


def _detect(state: FLDetectorState, rng: np.random.Generator) -> tuple[bool, int, list[int]]:
    """Step 5, among every client with a score, until the first time it flags clients: (ran, clusters, caught)."""
    candidates = sorted(state.distances)
    clusters, caught = 0, []
    detection = state.ready() and not state.excluded and len(candidates) >= 3
    if detection:
        values = np.array([state.score(p) for p in candidates], dtype=np.float64)
        clusters = gap_statistic_clusters(values, rng)
        if clusters > 1:
            caught = [p for p, high in zip(candidates, flag_high_cluster(values)) if high]
    for pid in caught:
        state.excluded.add(pid)
        state.last_round.pop(pid, None)
        state.last_update.pop(pid, None)
        state.distances.pop(pid, None)
    return detection, clusters, caught


def _aggregate_kept(U: np.ndarray, kept: np.ndarray, aggregation: str, weights: Any) -> tuple[np.ndarray, np.ndarray]:
    """The aggregate of the clients still trusted and each client's coefficient (0 for the others)."""
    n, d = U.shape
    coefficients = np.zeros(n)
    delta = np.zeros(d)
    if kept.any():
        rows = np.flatnonzero(kept)
        if aggregation == "median":
            out = coordinate_median(U[rows])
            delta, coefficients[rows] = out.delta, out.weights
        else:
            w = client_weights(None if weights is None else np.asarray(weights, dtype=np.float64)[rows], len(rows))
            delta, coefficients[rows] = w @ U[rows], w
    return delta, coefficients


def _remember(state: FLDetectorState, server_round: int, model: np.ndarray, U: np.ndarray, pids: list[int],
              kept: np.ndarray, delta: np.ndarray) -> None:
    """The histories: this round's model and update, the kept clients' updates, all bounded by the window."""
    state.rounds.append(int(server_round))
    state.models.append(model.astype(np.float32))
    state.aggregates.append(delta.astype(np.float32))
    del state.rounds[:-state.window - 1], state.models[:-state.window - 1], state.aggregates[:-state.window - 1]
    for i in np.flatnonzero(kept):
        state.last_round[pids[i]] = int(server_round)
        state.last_update[pids[i]] = U[i].astype(np.float32)
    oldest = state.rounds[0]
    for pid in [p for p, r in state.last_round.items() if r < oldest]:
        del state.last_round[pid], state.last_update[pid]
