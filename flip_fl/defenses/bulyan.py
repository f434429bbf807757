"""Bulyan (El Mhamdi, Guerraoui & Rouault, ICML 2018), with the selection Flower's new-style `Bulyan` uses."""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, column_chunks, pairwise_sq_dists
from flip_fl.defenses.krum import krum_scores


def bulyan(U: Any, num_malicious: int) -> AggregationOutcome:
    """Bulyan: a Krum-based selection of theta = n - 2f updates, then a coordinate-wise trimmed mean.

    1. Selection, as `flwr.serverapp.strategy.Bulyan` (one-shot Multi-Krum): the theta updates with the
       lowest Krum scores on the full set, each score summing the squared distances to the
       `max(1, n - f - 2)` nearest other updates (ties by client index). The paper instead re-runs Krum
       on the remaining set after each pick.
    2. Per coordinate, the mean of the beta = theta - 2f selected values closest to the coordinate-wise
       median of the selected set (ties by selection order).

    Requires `n >= 4f + 3`. `kept` marks the theta selected clients; `weights[i]` is client i's
    per-coordinate coefficient (1/beta when among the beta closest) averaged over coordinates.
    arrays: `"scores"` Krum scores, `"selection_order"` (theta,) indices by rising score, `"scale"` ones.
    info: `theta`, `beta`, `num_malicious`.
    """
    U = as_updates(U)
    n, d = U.shape
    f = int(num_malicious)
    if f < 0:
        raise ValueError(f"num_malicious must be >= 0; got {num_malicious}")
    if n < 4 * f + 3:
        raise ValueError(
            f"bulyan needs n_clients >= 4*num_malicious + 3, i.e. num_malicious <= {(n - 3) // 4} "
            f"for n_clients={n}; got num_malicious={f}"
        )
    theta = n - 2 * f
    beta = theta - 2 * f
    scores = krum_scores(pairwise_sq_dists(U), max(1, n - f - 2))
    sel = np.argsort(scores, kind="stable")[:theta]
    delta, counts = mean_around_median(U[sel], beta)
    weights = np.zeros(n)
    weights[sel] = counts / (beta * d)
    kept = np.zeros(n, dtype=bool)
    kept[sel] = True
    return AggregationOutcome(
        delta=delta,
        weights=weights,
        kept=kept,
        info={"theta": theta, "beta": beta, "num_malicious": f},
        arrays={"scores": scores, "selection_order": sel, "scale": np.ones(n)},
    )


def mean_around_median(selected: np.ndarray, beta: int) -> tuple[np.ndarray, np.ndarray]:
    """Bulyan's second stage on the selected rows.

    Per coordinate, the mean of the `beta` values closest to the median (ties by row order); also how many
    coordinates used each row.
    """
    theta, d = selected.shape
    delta = np.empty(d)
    counts = np.zeros(theta)
    for cols in column_chunks(theta, d):
        block = selected[:, cols]
        med = np.median(block, axis=0)
        idx = np.argsort(np.abs(block - med), axis=0, kind="stable")[:beta]
        delta[cols] = np.take_along_axis(block, idx, axis=0).mean(axis=0)
        counts += np.bincount(idx.ravel(), minlength=theta)
    return delta, counts
