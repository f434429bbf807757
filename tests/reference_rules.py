"""Reference aggregation rules that only tests use: the plain mean, the paper's (iterated-Krum) Bulyan and
the weighted mean of states. Production rules are in `flip_fl.defenses`."""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.bulyan import bulyan, mean_around_median
from flip_fl.defenses.common import AggregationOutcome, as_updates, client_weights, pairwise_sq_dists
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


def iterated_bulyan(U: Any, num_malicious: int) -> AggregationOutcome:
    """Bulyan (El Mhamdi et al., ICML 2018) with the paper's selection: Krum re-run on the remaining set.

    Selection: `theta = n - 2f` updates are chosen by applying Krum repeatedly to the remaining set (each
    pick is removed and scores are recomputed on the rest, with `max(1, n_remaining - f - 2)` neighbours --
    the inner steps cannot satisfy Krum's own `n > 2f + 2` once the set shrinks; this matches the paper's
    recursion and Flower's legacy `aggregate_bulyan`), written out here independently of the production
    rule's `iterated_krum`. The second stage and the outcome are those of `flip_fl.defenses.bulyan.bulyan`;
    `arrays["selection_order"]` lists the picks in order.
    """
    one_shot = bulyan(U, num_malicious, "one_shot")  # validates and gives theta, beta and the full-set Krum scores
    U = as_updates(U)
    n, f = U.shape[0], int(num_malicious)
    theta, beta = one_shot.info["theta"], one_shot.info["beta"]
    sq = pairwise_sq_dists(U)
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
    delta, counts = mean_around_median(U[sel], beta)
    weights = np.zeros(n)
    weights[sel] = counts / (beta * U.shape[1])
    kept = np.zeros(n, dtype=bool)
    kept[sel] = True
    return AggregationOutcome(delta=delta, weights=weights, kept=kept, info=dict(one_shot.info),
                              arrays={"scores": one_shot.arrays["scores"], "selection_order": sel, "scale": np.ones(n)})


def weighted_mean(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Entry-wise mean of client states with weights normalised to sum to one."""
    w = np.asarray(weights, dtype=np.float64)
    if len(states) == 0 or w.sum() <= 0:
        raise ValueError("weighted_mean needs at least one state and a positive total weight")
    w = w / w.sum()
    return {k: sum(wi * s[k].astype(np.float64) for wi, s in zip(w, states)) for k in states[0]}
