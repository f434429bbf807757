"""Reference aggregation rules that only tests use: the plain mean, the paper's (iterated-Krum) Bulyan and
the weighted mean of states. Production rules are in `flip_fl.defenses`."""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, client_weights, column_chunks, pairwise_sq_dists
from flip_fl.defenses.krum import krum_scores


def mean(U: Any, weights: Any = None) -> AggregationOutcome:
    """Plain (optionally example-weighted) average: FedAvg (McMahan et al., AISTATS 2017).

    `weights` (e.g. number of examples) default to uniform.  `outcome.weights` are the
    normalised coefficients.
    """
    U = as_updates(U)
    n = U.shape[0]
    w = client_weights(weights, n)
    return AggregationOutcome(
        delta=w @ U,
        weights=w,
        kept=np.ones(n, dtype=bool),
        info={"num_kept": n},
        arrays={"scale": np.ones(n)},
    )


def bulyan(U: Any, num_malicious: int) -> AggregationOutcome:
    """Bulyan (El Mhamdi et al., ICML 2018) with Krum as the selection rule.

    1. Selection: `theta = n - 2f` updates are chosen by applying Krum repeatedly to the
       remaining set (each pick is removed and scores are recomputed on the rest, with
       `max(1, n_remaining - f - 2)` neighbours -- the inner steps cannot satisfy Krum's
       own `n > 2f + 2` once the set shrinks; this matches the paper's recursion and
       Flower's legacy `aggregate_bulyan`).
    2. Per coordinate, average the `beta = theta - 2f` selected values closest to the
       coordinate-wise median of the selected set (ties by selection order).

    Requires `n >= 4f + 3`.  `kept` marks the theta selected clients; `weights[i]` is
    client i's per-coordinate coefficient (1/beta when among the beta closest) averaged over
    coordinates.  arrays: `"scores"` Krum scores on the full set, `"selection_order"`
    (theta,) indices in the order picked, `"scale"` ones.  info: `theta`, `beta`.
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

    sq = pairwise_sq_dists(U)
    full_scores = krum_scores(sq, max(1, min(n - 1, n - f - 2)))
    remaining = list(range(n))
    order: list[int] = []
    for _ in range(theta):
        m = len(remaining)
        if m == 1:
            pick = remaining[0]
        else:
            sub = sq[np.ix_(remaining, remaining)]
            s = krum_scores(sub, max(1, min(m - 1, m - f - 2)))
            pick = remaining[int(np.argmin(s))]
        order.append(pick)
        remaining.remove(pick)

    sel = np.asarray(order)
    S = U[sel]
    delta = np.empty(d)
    counts = np.zeros(theta)
    for cols in column_chunks(theta, d):
        block = S[:, cols]
        med = np.median(block, axis=0)
        idx = np.argsort(np.abs(block - med), axis=0, kind="stable")[:beta]
        delta[cols] = np.take_along_axis(block, idx, axis=0).mean(axis=0)
        counts += np.bincount(idx.ravel(), minlength=theta)
    weights = np.zeros(n)
    weights[sel] = counts / (beta * d)
    kept = np.zeros(n, dtype=bool)
    kept[sel] = True
    return AggregationOutcome(
        delta=delta,
        weights=weights,
        kept=kept,
        info={"theta": theta, "beta": beta, "num_malicious": f},
        arrays={"scores": full_scores, "selection_order": sel, "scale": np.ones(n)},
    )


def weighted_mean(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Entry-wise mean of client states with weights normalised to sum to one."""
    w = np.asarray(weights, dtype=np.float64)
    if len(states) == 0 or w.sum() <= 0:
        raise ValueError("weighted_mean needs at least one state and a positive total weight")
    w = w / w.sum()
    return {k: sum(wi * s[k].astype(np.float64) for wi, s in zip(w, states)) for k in states[0]}
