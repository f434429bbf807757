"""RFA: the geometric median by smoothed Weiszfeld (Pillutla, Kakade & Harchaoui, IEEE TSP 2022)."""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, client_weights


def geometric_median(
    U: Any,
    weights: Any = None,
    iters: int = 100,
    eps: float = 1e-6,
    tol: float = 1e-6,
) -> AggregationOutcome:
    """Geometric median by smoothed Weiszfeld: RFA (Pillutla, Kakade & Harchaoui, IEEE TSP 2022).

    Minimises `sum_i a_i * max(eps, ||z - u_i||)` approximately: start at the weighted
    mean, then repeat `b_i = a_i / max(eps, ||z - u_i||)`, `z = sum b_i u_i / sum b_i`
    for at most `iters` iterations, stopping early when the objective
    `sum_i a_i ||z - u_i||` changes by at most `tol` relative to its value.
    `a` = `weights` (num examples; default uniform).  The official RFA code uses 5
    "communication passes" (= `iters=4`, no early stop: `tol=0`) and smoothing 1e-6;
    the default here runs to convergence.

    `weights` in the outcome are the final normalised Weiszfeld coefficients b, so
    `delta == weights @ U`.  `kept` all True.  info: `iterations`, `objective`,
    `converged`.
    """
    U = as_updates(U)
    n = U.shape[0]
    if int(iters) < 0:
        raise ValueError(f"iters must be >= 0; got {iters}")
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps (smoothing) must be > 0; got {eps}")
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be >= 0; got {tol}")
    a = client_weights(weights, n)

    def dists(z: np.ndarray) -> np.ndarray:
        return np.array([np.linalg.norm(U[i] - z) for i in range(n)])

    b = a.copy()
    z = b @ U
    dist = dists(z)
    obj = float(a @ dist)
    converged = False
    iterations = 0
    for _ in range(int(iters)):
        iterations += 1
        b = a / np.maximum(eps, dist)
        b = b / b.sum()
        z = b @ U
        dist = dists(z)
        new_obj = float(a @ dist)
        if abs(obj - new_obj) <= tol * new_obj:
            obj = new_obj
            converged = True
            break
        obj = new_obj
    return AggregationOutcome(
        delta=z,
        weights=b,
        kept=np.ones(n, dtype=bool),
        info={"iterations": iterations, "objective": obj, "converged": converged},
        arrays={"scale": np.ones(n)},
    )
