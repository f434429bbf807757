"""Bulyan (El Mhamdi, Guerraoui & Rouault, ICML 2018): the paper's iterated-Krum selection, or Flower's one-shot one."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, column_chunks, pairwise_sq_dists
from flip_fl.defenses.krum import krum_scores

Selection = Literal["iterated", "one_shot"]


def bulyan(U: Any, num_malicious: int, selection: Selection = "iterated") -> AggregationOutcome:
    """Bulyan: a Krum-based selection of theta = n - 2f updates, then a coordinate-wise trimmed mean.

    1. Selection of theta updates:
       - `"iterated"` (the paper, and Flower's legacy `aggregate_bulyan`): Krum is applied to the
         remaining set, its pick removed, and again, theta times; each round's scores sum the squared
         distances to the `max(1, min(m - 1, m - f - 2))` nearest others of the m remaining (the inner
         steps cannot keep Krum's own bound once the set shrinks);
       - `"one_shot"` (`flwr.serverapp.strategy.Bulyan`): the theta lowest Krum scores on the full set,
         `max(1, n - f - 2)` neighbours.
       Ties go to the lower client index.
    2. Per coordinate, the mean of the beta = theta - 2f selected values closest to the coordinate-wise
       median of the selected set (ties by selection order).

    Requires `n >= 4f + 3`. `kept` marks the theta selected clients; `weights[i]` is client i's
    per-coordinate coefficient (1/beta when among the beta closest) averaged over coordinates.
    arrays: `"scores"` Krum scores on the full set, `"selection_order"` (theta,) indices in the order
    picked, `"scale"` ones.
    info: `theta`, `beta`, `num_malicious`, `selection`.
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
    if selection not in ("iterated", "one_shot"):
        raise ValueError(f"selection must be 'iterated' or 'one_shot'; got {selection!r}")
    theta = n - 2 * f
    beta = theta - 2 * f
    sq = pairwise_sq_dists(U)
    scores = krum_scores(sq, max(1, n - f - 2))
    sel = np.argsort(scores, kind="stable")[:theta] if selection == "one_shot" else iterated_krum(sq, f, theta)
    delta, counts = mean_around_median(U[sel], beta)
    weights = np.zeros(n)
    weights[sel] = counts / (beta * d)
    kept = np.zeros(n, dtype=bool)
    kept[sel] = True
    return AggregationOutcome(
        delta=delta,
        weights=weights,
        kept=kept,
        info={"theta": theta, "beta": beta, "num_malicious": f, "selection": selection},
        arrays={"scores": scores, "selection_order": sel, "scale": np.ones(n)},
    )


def iterated_krum(sq_dists: np.ndarray, num_malicious: int, count: int) -> np.ndarray:
    """Indices of `count` picks of Krum, each on the set the earlier picks left (the paper's Bulyan)."""
    remaining = list(range(sq_dists.shape[0]))
    order: list[int] = []
    for _ in range(count):
        m = len(remaining)
        sub = sq_dists[np.ix_(remaining, remaining)]
        scores = krum_scores(sub, max(1, min(m - 1, m - num_malicious - 2))) if m > 1 else np.zeros(1)
        order.append(remaining.pop(int(np.argmin(scores))))
    return np.asarray(order, dtype=np.int64)


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
