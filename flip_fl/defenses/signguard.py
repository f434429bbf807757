"""SignGuard (Xu et al., ICDCS 2022): norm filter, sign-statistics clustering, clipping to the median norm.

"Byzantine-robust Federated Learning through Collaborative Malicious Gradient Filtering", as in the authors'
code (github.com/JianXu95/SignGuard, `signguard_multiclass`):

1. Norm filter: with `med` the median update norm, keep the clients with `lower * med < ||u_i|| < upper * med`
   (strict, as the official code; paper and code: lower 0.1, upper 3.0).
2. Sign statistics on `max(1, int(coordinate_fraction * d))` coordinates drawn at random (seeded): each
   client's fractions of positive, zero and negative entries there, each feature divided by its largest
   value over the clients (+1e-8, as the official code).
3. MeanShift on those 3-D features (scikit-learn; bandwidth `estimate_bandwidth(quantile=0.5, n_samples=50)`,
   `bin_seeding=True`, `cluster_all=False`, as the official code); keep the largest cluster (ties: the lower
   label; points MeanShift leaves unassigned, label -1, are out). Where the estimated bandwidth is 0 --
   always with fewer than 4 clients, or when half of the clients share identical features -- MeanShift is
   undefined (scikit-learn refuses a zero bandwidth); its limit is used: the clusters are the groups of
   identical features and the largest one is kept, or every client when the largest size is tied. If
   MeanShift assigns no point at all, the sign stage keeps every client.
4. The good set is the intersection of both stages; every update is scaled by `min(1, med / ||u_i||)` and
   the good ones are averaged (unweighted, as the paper). When the good set is empty, `kept` is all False,
   `weights` and `delta` are zeros and `info["empty"]` is True (the caller decides what the round does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, column_chunks, row_norms

BANDWIDTH_QUANTILE = 0.5
"""The quantile of `sklearn.cluster.estimate_bandwidth` in the official code."""
BANDWIDTH_SAMPLES = 50
"""The points `estimate_bandwidth` samples in the official code (its own fixed random_state=0)."""


def norm_filter(norms: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Clients whose norm lies strictly between lower and upper times the median norm."""
    med = float(np.median(norms))
    return (norms > lower * med) & (norms < upper * med)


def sign_features(U: np.ndarray, coordinates: np.ndarray) -> np.ndarray:
    """(n, 3): each row's fractions of positive, zero and negative entries among `coordinates`.

    Each column is divided by its maximum over the rows (+1e-8), as the official code does. The entries are
    read in column chunks of bounded memory.
    """
    n = U.shape[0]
    counts = np.zeros((n, 3))
    for cols in column_chunks(n, len(coordinates)):
        S = U[:, coordinates[cols]]
        counts += np.stack([(S > 0).sum(axis=1), (S == 0).sum(axis=1), (S < 0).sum(axis=1)], axis=1)
    fractions = counts / len(coordinates)
    return np.asarray(fractions / (fractions.max(axis=0) + 1e-8))


def largest_cluster(features: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """The clients of the largest MeanShift cluster of `features` (see the module docstring).

    Returns the mask and info: `bandwidth`, `num_sign_clusters`, `sign_cluster_size`.
    """
    n = features.shape[0]
    bandwidth = 0.0
    if n >= 2:
        from sklearn.cluster import estimate_bandwidth  # imported here: scikit-learn is slow to import

        bandwidth = float(estimate_bandwidth(features, quantile=BANDWIDTH_QUANTILE, n_samples=BANDWIDTH_SAMPLES,
                                             random_state=0))
    if bandwidth > 0:
        from sklearn.cluster import MeanShift

        labels = np.asarray(MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=False).fit(features).labels_)
    else:
        _, labels = np.unique(features, axis=0, return_inverse=True)
        labels = labels.reshape(-1)
    ids = [int(c) for c in np.unique(labels) if c >= 0]
    sizes = [int(np.sum(labels == c)) for c in ids]
    info: dict[str, Any] = {"bandwidth": bandwidth, "num_sign_clusters": len(ids)}
    if not ids or (bandwidth == 0 and sizes.count(max(sizes)) > 1):
        info["sign_cluster_size"] = n
        return np.ones(n, dtype=bool), info
    best = ids[int(np.argmax(sizes))]
    info["sign_cluster_size"] = max(sizes)
    return labels == best, info


def signguard(U: Any, lower: float, upper: float, coordinate_fraction: float,
              rng: np.random.Generator) -> AggregationOutcome:
    """SignGuard's good set and the mean of its updates clipped to the median norm (see the module docstring).

    arrays: `"scale"` clip factors, `"norms"`, `"features"` (n, 3) sign features, `"coordinates"` the
    sampled coordinates, `"norm_kept"`, `"sign_kept"`. info: `clip_norm` (median norm), `num_norm_rejected`,
    `num_sign_rejected`, `num_coordinates`, `bandwidth`, `num_sign_clusters`, `sign_cluster_size`,
    `num_kept`, `empty`.
    """
    U = as_updates(U)
    n, d = U.shape
    if not 0 <= lower < 1 < upper or not np.isfinite(upper):
        raise ValueError(f"need 0 <= lower < 1 < upper < inf; got lower={lower}, upper={upper}")
    if not 0 < coordinate_fraction <= 1:
        raise ValueError(f"coordinate_fraction must be in (0, 1]; got {coordinate_fraction}")
    norms = row_norms(U)
    med = float(np.median(norms))
    by_norm = norm_filter(norms, lower, upper)
    b = max(1, int(coordinate_fraction * d))
    idx = np.sort(rng.choice(d, size=b, replace=False))
    features = sign_features(U, idx)
    by_sign, info = largest_cluster(features)
    good = by_norm & by_sign
    count = int(good.sum())
    scale = np.where(norms > med, med / np.where(norms > 0, norms, 1.0), 1.0)
    weights = good / count if count else np.zeros(n)
    return AggregationOutcome(
        delta=(weights * scale) @ U,
        weights=weights,
        kept=good,
        info={"clip_norm": med, "num_norm_rejected": int(n - by_norm.sum()),
              "num_sign_rejected": int(n - by_sign.sum()), "num_coordinates": b, **info, "num_kept": count,
              "empty": count == 0},
        arrays={"scale": scale, "norms": norms, "features": features, "coordinates": idx, "norm_kept": by_norm,
                "sign_kept": by_sign},
    )
