"""Divide-and-Conquer, DnC (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the Byzantine").

`iterations` times:

1. draw `sub_dim` coordinates at random without replacement (all of them when the update has no more);
2. centre the sub-sampled updates on their mean;
3. take the top right singular vector `v` of the centred (n, b) matrix (through the (n, n) Gram matrix);
4. outlier score of each client = (centred_i . v)^2;
5. keep the `n - num_remove` clients with the lowest scores (ties: the lower row first).

The good set is the intersection of the kept sets of all iterations; the aggregate is the plain mean of
the good updates (the paper's `mean`, unweighted). `num_remove` is `ceil(c * f)` (`removed_count`): c the
filtering fraction, f the assumed number of attackers. When the kept sets do not intersect, `kept` is all
False, `weights` and `delta` are zeros and `info["empty"]` is True (the caller decides what a round does
then).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates


def removed_count(filter_frac: float, num_malicious: int) -> int:
    """How many clients each iteration removes: ceil(c * f) (c * f rounded up, as `int(n - c f)` keeps)."""
    return math.ceil(filter_frac * num_malicious - 1e-9)


def outlier_scores(S: np.ndarray) -> np.ndarray:
    """DnC's outlier scores of the rows of a sub-sampled matrix (zeros when the rows are all equal).

    The squared projections of the centred rows C on their top right singular vector v. With u the top
    eigenvector of the (n, n) Gram matrix C C^T and lambda its eigenvalue, C v = sqrt(lambda) u, so the scores
    are lambda * u_i^2: the same numbers as from an SVD of the (n, b) matrix, at a fraction of the cost.
    """
    centred = S - S.mean(axis=0)
    if not np.any(centred):
        return np.zeros(S.shape[0])
    eigenvalues, eigenvectors = np.linalg.eigh(centred @ centred.T)
    return np.asarray(max(float(eigenvalues[-1]), 0.0) * eigenvectors[:, -1] ** 2)


def dnc(U: Any, num_remove: int, sub_dim: int, iterations: int, rng: np.random.Generator) -> AggregationOutcome:
    """DnC's good set and its mean (see the module docstring).

    arrays: `"scores"` (iterations, n) outlier scores, `"coordinates"` (iterations, b) the sampled
    coordinates. info: `num_removed` (per iteration), `sub_dim` (b used), `iterations`, `num_kept`, `empty`.
    """
    U = as_updates(U)
    n, d = U.shape
    if int(num_remove) != num_remove or not 0 <= num_remove < n:
        raise ValueError(f"num_remove must be an integer in [0, n_clients - 1 = {n - 1}]; got {num_remove}")
    if int(sub_dim) != sub_dim or sub_dim < 1:
        raise ValueError(f"sub_dim must be an integer >= 1; got {sub_dim}")
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1; got {iterations}")
    b = min(int(sub_dim), d)
    good = np.ones(n, dtype=bool)
    scores = np.empty((int(iterations), n))
    coordinates = np.empty((int(iterations), b), dtype=np.int64)
    for it in range(int(iterations)):
        idx = np.sort(rng.choice(d, size=b, replace=False))
        scores[it] = outlier_scores(U[:, idx])
        kept = np.zeros(n, dtype=bool)
        kept[np.argsort(scores[it], kind="stable")[: n - int(num_remove)]] = True
        good &= kept
        coordinates[it] = idx
    count = int(good.sum())
    weights = good / count if count else np.zeros(n)
    return AggregationOutcome(
        delta=weights @ U,
        weights=weights,
        kept=good,
        info={"num_removed": int(num_remove), "sub_dim": b, "iterations": int(iterations), "num_kept": count,
              "empty": count == 0},
        arrays={"scores": scores, "coordinates": coordinates},
    )
