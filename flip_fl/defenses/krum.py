"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017): select the updates closest to their neighbours.

Distances are float64 sums of each pair's differences (`common.pairwise_sq_dists`) on the updates, so
the selection is exact however small the updates are next to the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, client_weights, pairwise_sq_dists


def krum_scores(sq_dists: np.ndarray, num_neighbors: int) -> np.ndarray:
    """Sum of the `num_neighbors` smallest squared distances to OTHER rows."""
    n = sq_dists.shape[0]
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(sq_dists[i], i)
        scores[i] = np.sort(others)[:num_neighbors].sum()
    return scores


def krum(
    U: Any, num_malicious: int, multi_k: int = 1, weights: Any = None, strict: bool = True
) -> AggregationOutcome:
    """Krum / Multi-Krum (Blanchard et al., NeurIPS 2017).

    Score of client i = sum of squared L2 distances to its `n - f - 2` nearest other
    updates (`f = num_malicious`); requires `n > 2f + 2`.  Krum (`multi_k == 1`)
    returns the single lowest-score update; Multi-Krum (`multi_k > 1`) averages the
    `multi_k` lowest-score updates (ties broken by client index).  The paper's Multi-Krum
    average is unweighted (default); pass `weights` (num examples) to weight the selected
    updates like Flower's `MultiKrum` does.

    `strict=False` is Flower's rule (`flwr.serverapp.strategy.Krum`, `MultiKrum`): no requirement,
    `max(1, n - f - 2)` neighbours. It reproduces papers that ran Krum beyond its guarantee (e.g. 4
    attackers among 10 sampled clients) and rounds that lost clients to failures.

    arrays: `"scores"` (n,) Krum scores, `"scale"` ones.
    info: `num_selected`, `num_neighbors`, `num_malicious`.
    """
    U = as_updates(U)
    n = U.shape[0]
    f = int(num_malicious)
    if f < 0:
        raise ValueError(f"num_malicious must be >= 0; got {num_malicious}")
    if strict and n <= 2 * f + 2:
        raise ValueError(
            f"krum needs n_clients > 2*num_malicious + 2, i.e. num_malicious <= {(n - 3) // 2} "
            f"for n_clients={n}; got num_malicious={f} (strict=False: Flower's unchecked rule)"
        )
    k = int(multi_k)
    if not 1 <= k <= n:
        raise ValueError(f"multi_k must be in [1, n_clients={n}]; got {multi_k}")
    client_weights(weights, n)  # validation
    raw = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)

    num_neighbors = n - f - 2 if strict else max(1, n - f - 2)
    scores = krum_scores(pairwise_sq_dists(U), num_neighbors)
    selected = np.argsort(scores, kind="stable")[:k]
    kept = np.zeros(n, dtype=bool)
    kept[selected] = True
    w = np.where(kept, raw, 0.0)
    w = w / w.sum() if w.sum() > 0 else np.where(kept, 1.0 / k, 0.0)
    return AggregationOutcome(
        delta=w @ U,
        weights=w,
        kept=kept,
        info={"num_selected": k, "num_neighbors": num_neighbors, "num_malicious": f},
        arrays={"scores": scores, "scale": np.ones(n)},
    )
