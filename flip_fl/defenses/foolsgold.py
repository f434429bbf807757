"""FoolsGold (Fung, Yoon & Beschastnikh, RAID 2020): down-weight clients whose update histories look alike."""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, coordinate_mask, cosine_similarity


def foolsgold(
    U: Any,
    history: Any = None,
    confidence: float = 1.0,
    similarity_mask: Any = None,
    normalize: bool = True,
    epsilon: float = 1e-5,
) -> AggregationOutcome:
    """FoolsGold (Fung, Yoon & Beschastnikh, RAID 2020).

    `history` (n, h) holds each client's accumulated past updates, row-aligned with `U`
    (zeros / None for clients never seen); `h = d` or, with `similarity_mask` (bool (d,),
    e.g. only the output layer), `h = mask.sum()`.  This call adds the current updates:
    `new_history = history + U[:, mask]`, returned as `arrays["history"]`; the caller
    stores each row back under the client's partition id.

    Weights follow the reference implementation: cosine similarity of the histories
    (self excluded), pardoning (`cs_ij *= maxcs_i / maxcs_j` when `maxcs_i < maxcs_j`, with
    `epsilon` added to maxcs), `wv = clip(1 - max_j cs_ij, 0, 1)`, rescale by max, set 1 ->
    0.99, logit `confidence * (ln(wv / (1 - wv)) + 0.5)` for wv > 0, clip to [0, 1].
    Identical sybils get 0 (values of `1 - max cs` below 1e-12 are treated as 0, which
    removes rounding noise).  If every score is 0 (all clients identical) the delta is 0
    (the reference code returns NaN there).

    Aggregate: `normalize=True` -> `sum wv_i u_i / sum wv_i` (scale comparable to the
    mean); `normalize=False` -> `sum wv_i u_i / n` (the "1/n" variant used by several
    backdoor benchmarks; the original FedSGD code returns the un-normalised sum).
    `outcome.weights` are the coefficients actually applied; `arrays["scores"]` the raw
    FoolsGold weights in [0, 1].  `kept = scores > 0`.
    """
    U = as_updates(U)
    n, d = U.shape
    mask = coordinate_mask(similarity_mask, d, "similarity_mask")
    feats = U if mask is None else U[:, mask]
    hist = _history(history, n, feats.shape[1])
    if not (np.isfinite(confidence) and confidence > 0):
        raise ValueError(f"confidence (kappa) must be > 0; got {confidence}")
    if not (np.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be >= 0; got {epsilon}")
    new_hist = hist + feats
    scores = foolsgold_scores(new_hist, confidence, epsilon)

    total = scores.sum()
    if total <= 0:
        coef = np.zeros(n)
    elif normalize:
        coef = scores / total
    else:
        coef = scores / n
    return AggregationOutcome(
        delta=coef @ U,
        weights=coef,
        kept=scores > 0,
        info={"num_kept": int(np.sum(scores > 0)), "sum_scores": float(total)},
        arrays={"scores": scores, "history": new_hist, "scale": np.ones(n)},
    )


def foolsgold_scores(history: np.ndarray, confidence: float, epsilon: float) -> np.ndarray:
    """FoolsGold's per-client weights in [0, 1] from the (updated) histories, as in the reference code."""
    n = history.shape[0]
    # As in the reference code, the diagonal of cs is cos(i, i) - 1 (= 0 for a non-zero row)
    # and takes part in the maxima.
    cs = cosine_similarity(history) - np.eye(n)
    maxcs = np.max(cs, axis=1) + epsilon
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i, j] = cs[i, j] * maxcs[i] / maxcs[j]
    wv = np.clip(1.0 - np.max(cs, axis=1), 0.0, 1.0)
    # Rounding noise (cos of identical vectors = 1 - 2e-16) would otherwise be blown up to
    # full weight by the rescaling below when all clients are identical.
    wv[wv < 1e-12] = 0.0
    top = wv.max()
    if top > 0:
        wv = wv / top
        wv[wv == 1.0] = 0.99
        pos = wv > 0
        wv[pos] = confidence * (np.log(wv[pos] / (1.0 - wv[pos])) + 0.5)
        wv = np.clip(wv, 0.0, 1.0)
    return wv


def _history(history: Any, n: int, h: int) -> np.ndarray:
    """The accumulated updates as a float64 (n, h) matrix (zeros when None)."""
    if history is None:
        return np.zeros((n, h))
    hist = np.asarray(history, dtype=np.float64)
    if hist.shape != (n, h):
        raise ValueError(f"history must have shape ({n}, {h}) (n_clients, masked d); got {hist.shape}")
    return hist
