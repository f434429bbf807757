"""Coordinate-wise trimmed mean (Yin et al., ICML 2018)."""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, sorted_column_blocks


def trimmed_mean(U: Any, beta: float) -> AggregationOutcome:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018).

    Per coordinate, drop the `k = floor(beta * n)` smallest and `k` largest values and
    average the rest (same rule as `scipy.stats.trim_mean` and Flower's FedTrimmedAvg).
    `beta` must be in `[0, 0.5)`.  `weights[i]` = fraction of coordinates where client
    i survived, divided by `n - 2k`.  `kept` is all True.  info: `num_trimmed_per_side`.
    """
    U = as_updates(U)
    n, d = U.shape
    b = float(beta)
    if not 0.0 <= b < 0.5:
        raise ValueError(f"beta (fraction trimmed from each side) must be in [0, 0.5); got {beta}")
    k = int(b * n)
    m = n - 2 * k
    delta = np.empty(d)
    counts = np.zeros(n)
    for cols, order, srt in sorted_column_blocks(U):
        delta[cols] = srt[k : n - k].mean(axis=0)
        counts += np.bincount(order[k : n - k].ravel(), minlength=n)
    return AggregationOutcome(
        delta=delta,
        weights=counts / (m * d),
        kept=np.ones(n, dtype=bool),
        info={"num_trimmed_per_side": k, "beta": b},
        arrays={"scale": np.ones(n)},
    )
