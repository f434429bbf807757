"""Centered clipping (Karimireddy, He & Jaggi, ICML 2021, "Learning from History for Byzantine Robust Optimization").

Starting from `v_0` (the previous round's aggregate; zeros in the first round), `iterations` times:

    v_{l+1} = v_l + (1/n) sum_i clip_tau(x_i - v_l),    clip_tau(z) = z * min(1, tau / ||z||)

and the aggregate is `v_L`. Every step is an affine combination of `v_l` and the updates: with
`c_i` the clip factors and `m = mean_i c_i`, `v_{l+1} = (1 - m) v_l + sum_i (c_i / n) x_i`, so
`v_L = a v_0 + sum_i w_i x_i` with `a + sum_i w_i = 1`. `weights` are those `w_i` (each client's
coefficient in the aggregate, clipping included) and `info["history_weight"]` is `a`.

The distances `||x_i - v_l||` are summed over column chunks of bounded memory (never the Gram form),
and the step is `(c @ U) / n - m v_l`, so no (n, d) temporary is made.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, column_chunks


def distances_to(U: np.ndarray, v: np.ndarray) -> np.ndarray:
    """||U_i - v|| for every row, summed over column chunks (no (n, d) temporary)."""
    n, d = U.shape
    sq = np.zeros(n)
    for cols in column_chunks(n, d):
        diff = U[:, cols] - v[cols]
        sq += np.einsum("ij,ij->i", diff, diff)
    return np.sqrt(sq)


def clip_factors(dist: np.ndarray, tau: float) -> np.ndarray:
    """min(1, tau / dist) per client (1 where the distance is 0)."""
    return np.where(dist > tau, tau / np.where(dist > 0, dist, 1.0), 1.0)


def centered_clip(U: Any, previous: Any, tau: float, iterations: int) -> AggregationOutcome:
    """Centered clipping of the rows of `U` around `previous` (None: zeros), `iterations` times.

    Returns the aggregate `v_L` as `delta`; `weights` the coefficients w_i of the updates in it (see the
    module docstring), `kept` all True (no client is rejected). arrays: `"clip_factors"` (n, iterations)
    and `"distances"` (n, iterations), each iteration's `min(1, tau / ||x_i - v_l||)` and distance. info:
    `tau`, `iterations`, `history_weight` (a), `num_clipped` (clients clipped in the last iteration),
    `previous_norm` (||v_0||), `moved` (||v_L - v_0||).
    """
    U = as_updates(U)
    n, d = U.shape
    t = float(tau)
    if not (np.isfinite(t) and t > 0):
        raise ValueError(f"tau must be a finite number > 0; got {tau}")
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1; got {iterations}")
    v0 = np.zeros(d) if previous is None else np.asarray(previous, dtype=np.float64).reshape(-1)
    if v0.shape != (d,) or not np.all(np.isfinite(v0)):
        raise ValueError(f"previous must be a finite vector of shape ({d},); got {np.shape(previous)}")
    v, a, w = v0.copy(), 1.0, np.zeros(n)
    factors, distances = np.empty((n, int(iterations))), np.empty((n, int(iterations)))
    for step in range(int(iterations)):
        dist = distances_to(U, v)
        c = clip_factors(dist, t)
        m = float(c.mean())
        v = (c @ U) / n + (1.0 - m) * v
        a, w = (1.0 - m) * a, (1.0 - m) * w + c / n
        factors[:, step], distances[:, step] = c, dist
    return AggregationOutcome(
        delta=v,
        weights=w,
        kept=np.ones(n, dtype=bool),
        info={"tau": t, "iterations": int(iterations), "history_weight": a,
              "num_clipped": int(np.sum(factors[:, -1] < 1.0)), "previous_norm": float(np.linalg.norm(v0)),
              "moved": float(np.linalg.norm(v - v0))},
        arrays={"clip_factors": factors, "distances": distances},
    )
