"""AlignIns (Xu, Zhang & Hu, CVPR 2025): direction alignment inspection, MZ-score filtering, clipping.

"Detecting Backdoor Attacks in Federated Learning via Direction Alignment Inspection"; the authors' code is
github.com/JiiahaoXU/AlignIns (`src/aggregation.py`, `agg_alignins`), which this follows.

1. TDA (temporal direction alignment) of update u_i: cos(u_i, theta), theta the current global model's
   parameters (the same coordinates as the updates).
2. MPSA (masked principal sign alignment): the principal sign p = sign(sum_i sign(u_i)) per coordinate;
   MPSA_i = the fraction of the top-k coordinates of |u_i| (k = floor(sparsity * d), at least 1) where
   sign(u_i) == p.
3. MZ-score of each metric: |x_i - median(x)| / std(x) (population std, as the authors' `np.std`); 0 for
   every client when std(x) = 0 (all values equal the median). A client is kept when
   MZ(MPSA_i) < lambda_s and MZ(TDA_i) < lambda_c.
4. Post-filtering clipping: S = the median L2 norm of the kept updates; every update is scaled by
   min(1, S / ||u_i||); the aggregate is the weighted mean of the kept, clipped updates (the authors'
   `agg_avg` weights by data size). Nobody kept: a zero update.

`weights` = the client weights over the kept clients (0 elsewhere, all 0 when none is kept).  arrays:
`"tda"`, `"mpsa"`, `"mz_tda"`, `"mz_mpsa"`, `"scale"` (clip factors, for every client), `"norms"`.
info: `num_kept`, `clip_norm` (S; NaN when none kept), `top_k`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, client_weights, column_chunks, row_norms


def mz_scores(x: Any) -> np.ndarray:
    """AlignIns' MZ-score |x - median(x)| / std(x) per entry; all 0 when std(x) is 0."""
    x = np.asarray(x, dtype=np.float64)
    std = float(np.std(x))
    return np.abs(x - np.median(x)) / std if std > 0 else np.zeros_like(x)


def tda(U: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine of each row of U with `reference` (0 for a zero row or reference)."""
    norms = row_norms(U) * float(np.linalg.norm(reference))
    dots = U @ reference
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def principal_sign(U: np.ndarray) -> np.ndarray:
    """sign(sum_i sign(u_i)) per coordinate, summed over column chunks (int8 signs)."""
    n, d = U.shape
    out = np.zeros(d, dtype=np.int8)
    for cols in column_chunks(n, d):
        out[cols] = np.sign(np.sign(U[:, cols]).sum(axis=0))
    return out


def mpsa(U: np.ndarray, sparsity: float) -> tuple[np.ndarray, int]:
    """(MPSA per client, k): agreement with the principal sign on each client's top-k coordinates by |u|."""
    n, d = U.shape
    k = max(1, int(d * sparsity))
    major = principal_sign(U)
    out = np.empty(n)
    for i in range(n):
        top = np.argpartition(-np.abs(U[i]), k - 1)[:k] if k < d else np.arange(d)
        out[i] = float(np.mean(np.sign(U[i, top]) == major[top]))
    return out, k


def alignins(U: Any, global_params: Any, sparsity: float = 0.3, lambda_s: float = 1.0, lambda_c: float = 1.0,
             weights: Any = None) -> AggregationOutcome:
    """AlignIns: TDA and MPSA, MZ-score filtering, clipping to the kept updates' median norm (module docstring)."""
    U = as_updates(U)
    n, d = U.shape
    theta = np.asarray(global_params, dtype=np.float64).reshape(-1)
    if theta.shape != (d,) or not np.all(np.isfinite(theta)):
        raise ValueError(f"global_params must be {d} finite values; got shape {theta.shape}")
    if not 0.0 < sparsity <= 1.0:
        raise ValueError(f"sparsity must be in (0, 1]; got {sparsity}")
    if not (lambda_s > 0 and lambda_c > 0):
        raise ValueError(f"lambda_s and lambda_c must be > 0; got {lambda_s}, {lambda_c}")
    w_all = client_weights(weights, n)
    t = tda(U, theta)
    m, k = mpsa(U, sparsity)
    mz_t, mz_m = mz_scores(t), mz_scores(m)
    kept = (mz_m < lambda_s) & (mz_t < lambda_c)
    norms = row_norms(U)
    clip = float(np.median(norms[kept])) if kept.any() else float("nan")
    scale = np.where(norms > clip, clip / np.where(norms > 0, norms, 1.0), 1.0) if kept.any() else np.ones(n)
    w = np.where(kept, w_all, 0.0)
    total = w.sum()
    w = w / total if total > 0 else (kept / kept.sum() if kept.any() else w)
    return AggregationOutcome(
        delta=(w * scale) @ U,
        weights=w,
        kept=kept,
        info={"num_kept": int(kept.sum()), "clip_norm": clip, "top_k": k},
        arrays={"tda": t, "mpsa": m, "mz_tda": mz_t, "mz_mpsa": mz_m, "scale": scale, "norms": norms},
    )
