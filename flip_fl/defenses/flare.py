"""FLARE (Wang, Xiao, Chen, Hu, Lou & Hou, AsiaCCS 2022): trust from penultimate-layer representations.

"FLARE: Defending Federated Learning against Model Poisoning Attacks via Latent Space Representations"; the
authors' code is github.com/ning-wang1/flare_poisoning_detection (`detect.py`, `utils/mmd.py`,
`agg_alg.soft_agg`), which this follows. The representations themselves (each local model's
penultimate-layer outputs on the server's data) are computed by `strategies/flare.py`; the rule here
takes them as given.

1. Discrepancy: MMD^2_u, the unbiased squared maximum mean discrepancy, between the representation sets
   X_i and X_j of every pair of clients, with the RBF kernel exp(-gamma ||x - y||^2) and gamma =
   1 / (number of features) (scikit-learn's `pairwise_kernels` default the authors use); negative values
   are set to 0.
2. Votes: every client votes for its `num_neighbors(n)` = max(1, floor(n / 2) - 1) nearest other clients by
   MMD (the authors' `argsort(mmd)[:, 1:int(0.5 * n)]`, self first); c_i = the votes client i received.
   A client whose representations are not finite casts no vote and receives none.
3. Trust: TS_i = exp(c_i / (tau * mean(c))) / sum_j exp(c_j / (tau * mean(c))) (the authors'
   `count_to_trustscore`, tau = 1); all counts 0 (no finite representations): equal trust.
4. Aggregate: sum_i TS_i u_i (the authors' `soft_agg`: the trust scores are the weights, not data sizes).

`weights` = TS; `kept` all True (trust is soft, nobody is rejected).  arrays: `"mmd"` (n, n) (inf to and
from a client without finite representations), `"counts"`.  info: `num_neighbors`, `rbf_gamma`,
`min_count`, `max_count`, `num_unusable` (clients without finite representations).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, column_chunks


def num_neighbors(n: int) -> int:
    """Clients each client votes for: max(1, floor(n / 2) - 1), at most n - 1 (0 for a single client)."""
    return 0 if n < 2 else min(n - 1, max(1, n // 2 - 1))


def pairwise_mmd(representations: Sequence[Any], gamma: float | None = None
                 ) -> tuple[np.ndarray, float, np.ndarray]:
    """((n, n) MMD^2_u between the sets, clipped at 0; gamma; usable): RBF kernel, gamma = 1 / features by default.

    Each set is (m_i, features) with m_i >= 2. A set with a non-finite value or squared norm is not usable:
    it is at distance inf from every other set.
    """
    sets = [np.asarray(r, dtype=np.float64) for r in representations]
    n = len(sets)
    if n == 0:
        raise ValueError("representations must hold at least one set")
    features = {s.shape[1] if s.ndim == 2 else -1 for s in sets}
    if len(features) != 1 or -1 in features or any(s.shape[0] < 2 for s in sets):
        raise ValueError("every representation set must be (m >= 2, features) with the same number of features")
    f = features.pop()
    g = 1.0 / f if gamma is None else float(gamma)
    with np.errstate(over="ignore", invalid="ignore"):
        ok = np.array([bool(np.all(np.isfinite(np.einsum("ij,ij->i", s, s)))) for s in sets])
    sizes = np.array([s.shape[0] for s in sets])
    good = np.flatnonzero(ok)
    points = np.concatenate([sets[i] for i in good]) if good.size else np.zeros((0, f))
    owner = np.repeat(np.arange(good.size), sizes[good])
    starts = np.concatenate([[0], np.cumsum(sizes[good])])
    sq = np.einsum("ij,ij->i", points, points)
    sums = np.zeros((good.size, good.size))
    traces = np.zeros(good.size)
    for a, i in enumerate(good):
        x = sets[i]
        for cols in column_chunks(x.shape[0], points.shape[0]):
            d2 = np.maximum(sq[starts[a]:starts[a + 1], None] + sq[None, cols] - 2.0 * x @ points[cols].T, 0.0)
            k = np.exp(-g * d2)
            sums[a] += np.bincount(owner[cols], weights=k.sum(axis=0), minlength=good.size)
            own = np.arange(max(starts[a], cols.start), min(starts[a + 1], cols.stop))
            traces[a] += float(k[own - starts[a], own - cols.start].sum())
    m = sizes[good].astype(np.float64)
    within = (np.diag(sums) - traces) / (m * (m - 1.0))
    between = 0.5 * (sums + sums.T) / np.outer(m, m)
    mmd = np.full((n, n), np.inf)
    mmd[np.ix_(good, good)] = np.maximum(within[:, None] + within[None, :] - 2.0 * between, 0.0)
    np.fill_diagonal(mmd, 0.0)
    return mmd, g, ok


def neighbor_counts(mmd: np.ndarray, usable: np.ndarray) -> tuple[np.ndarray, int]:
    """(votes each client received, k): each usable client votes for its k nearest other usable clients.

    Ties go to the lower index (stable sort).
    """
    n = mmd.shape[0]
    k = num_neighbors(n)
    counts = np.zeros(n, dtype=np.int64)
    for j in np.flatnonzero(usable):
        others = np.array([i for i in range(n) if i != j and usable[i]], dtype=np.int64)
        if others.size:
            chosen = others[np.argsort(mmd[j, others], kind="stable")[:k]]
            counts[chosen] += 1
    return counts, k


def trust_scores(counts: Any, tau: float = 1.0) -> np.ndarray:
    """exp(c_i / (tau * mean(c))), normalised to sum 1; equal trust when every count is 0."""
    c = np.asarray(counts, dtype=np.float64)
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0; got {tau}")
    mean = float(c.mean())
    if mean == 0.0:
        return np.full(c.size, 1.0 / c.size)
    z = c / (tau * mean)
    e = np.exp(z - z.max())
    return e / e.sum()


def flare(U: Any, representations: Sequence[Any], tau: float = 1.0) -> AggregationOutcome:
    """FLARE: trust-weighted sum of the updates, trust from MMD nearest-neighbour votes (module docstring)."""
    U = as_updates(U)
    n = U.shape[0]
    if len(representations) != n:
        raise ValueError(f"need one representation set per client: {len(representations)} sets for {n} clients")
    mmd, gamma, usable = pairwise_mmd(representations)
    counts, k = neighbor_counts(mmd, usable)
    ts = trust_scores(counts, tau)
    return AggregationOutcome(
        delta=ts @ U,
        weights=ts,
        kept=np.ones(n, dtype=bool),
        info={"num_neighbors": k, "rbf_gamma": gamma, "min_count": int(counts.min()), "max_count": int(counts.max()),
              "num_unusable": int((~usable).sum())},
        arrays={"mmd": mmd, "counts": counts},
    )
