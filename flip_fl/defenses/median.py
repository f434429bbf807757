"""Coordinate-wise median (Yin et al., ICML 2018)."""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, sorted_column_blocks


def coordinate_median(U: Any) -> AggregationOutcome:
    """Coordinate-wise median (Yin et al., ICML 2018); same as `np.median(U, axis=0)`.

    For even n the two middle values are averaged.  `weights[i]` = client i's median
    coefficient (1 for odd n, 1/2 for each middle value for even n) averaged over
    coordinates; ties in value are attributed by client index.  `kept` is all True.
    """
    U = as_updates(U)
    n, d = U.shape
    delta = np.empty(d)
    counts = np.zeros(n)
    for cols, order, srt in sorted_column_blocks(U):
        if n % 2:
            delta[cols] = srt[n // 2]
            counts += np.bincount(order[n // 2], minlength=n)
        else:
            delta[cols] = 0.5 * (srt[n // 2 - 1] + srt[n // 2])
            counts += 0.5 * (
                np.bincount(order[n // 2 - 1], minlength=n) + np.bincount(order[n // 2], minlength=n)
            )
    return AggregationOutcome(
        delta=delta,
        weights=counts / d,
        kept=np.ones(n, dtype=bool),
        info={},
        arrays={"scale": np.ones(n)},
    )
