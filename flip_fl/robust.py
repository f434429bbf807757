"""Robust aggregation and client-reweighting defenses, in plain numpy.

Every rule takes the clients' UPDATES (``delta_i = local_i - global``) stacked as a
float matrix ``U`` of shape ``(n_clients, d)`` and returns an
:class:`AggregationOutcome`.  The caller applies ``global += server_lr * outcome.delta``.

Conventions shared by all rules
-------------------------------
* ``outcome.delta``   (d,) float64: the aggregate update (noise included where a rule adds
  noise).
* ``outcome.weights`` (n,) float64: the coefficient each client received in the result.
  For rules that average (possibly rescaled) updates, ``weights`` are the averaging
  coefficients: they sum to 1 over the accepted clients (or are all 0 when nothing is
  accepted) and excluded clients get 0, so that
  ``delta == sum_i weights[i] * arrays["scale"][i] * U[i]`` (+ noise).
  For coordinate-wise rules (median, trimmed mean, Bulyan's second stage) ``weights[i]`` is
  client i's coefficient averaged over the d coordinates (e.g. the fraction of coordinates
  where it was the median); they still sum to 1 and a client that is always trimmed gets 0.
  Geometric median reports the final Weiszfeld weights (``delta == weights @ U``).
  RLR reports the plain averaging weights (its sign flip is per coordinate).
* ``outcome.kept``    (n,) bool: True if the client was accepted by a client-level
  decision.  Coordinate-wise rules (median, trimmed mean, geometric median, RLR) never
  reject a client as a whole, so they report all True; look at ``weights`` instead.
* ``outcome.info``    dict of JSON-friendly scalars (int / float / bool / None).
* ``outcome.arrays``  dict of per-client (or other) numpy arrays, documented per rule
  (e.g. ``"scores"``, ``"scale"``, ``"history"``, ``"labels"``).

Invalid arguments raise ``ValueError`` naming the parameter and the allowed range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "AggregationOutcome",
    "mean",
    "krum",
    "bulyan",
    "coordinate_median",
    "trimmed_mean",
    "norm_clip",
    "weak_dp",
    "geometric_median",
    "foolsgold",
    "robust_lr",
    "fltrust",
    "flame",
    "detection_scores",
    "flatten_state",
    "unflatten",
    "bn_statistic_mask",
    "BN_STATISTIC_SUFFIXES",
]

#: state_dict entry suffixes that hold BatchNorm statistics rather than trained weights.
BN_STATISTIC_SUFFIXES: tuple[str, ...] = ("running_mean", "running_var", "num_batches_tracked")

# Matrix elements (n * columns) processed at once by the coordinate-wise rules: bounds each
# temporary to about 8 * _CHUNK_ELEMENTS bytes (32 MiB) whatever the model size.
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class AggregationOutcome:
    """Result of one aggregation rule (see the module docstring for the conventions)."""

    delta: np.ndarray
    weights: np.ndarray
    kept: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _as_updates(U: Any) -> np.ndarray:
    """Validate and convert the update matrix to float64 (n, d)."""
    arr = np.asarray(U, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"U must be a 2-D array (n_clients, d); got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"U must have n_clients >= 1 and d >= 1; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("U must contain only finite values (found NaN or inf)")
    return arr


def _client_weights(weights: Any, n: int, name: str = "weights") -> np.ndarray:
    """Return non-negative per-client weights normalised to sum 1 (None -> uniform)."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one per client); got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{name} must be finite and >= 0")
    total = w.sum()
    if total <= 0:
        raise ValueError(f"{name} must have a positive sum")
    return w / total


def _mask(mask: Any, d: int, name: str) -> np.ndarray | None:
    """Validate an optional boolean coordinate mask of length d."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype != np.bool_ or m.shape != (d,):
        raise ValueError(f"{name} must be a boolean array of shape ({d},); got {m.dtype} {m.shape}")
    return m


def _row_norms(U: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", U, U))


def _pairwise_sq_dists(U: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows (Gram form, clamped at 0, exact 0 diagonal)."""
    sq = np.einsum("ij,ij->i", U, U)
    gram = U @ U.T
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def _cosine_similarity(X: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows; a zero row has similarity 0 with everything (as sklearn)."""
    norms = _row_norms(X)
    safe = np.where(norms > 0, norms, 1.0)
    Xn = X / safe[:, None]
    cs = Xn @ Xn.T
    return np.clip(cs, -1.0, 1.0)


def _column_chunks(n: int, d: int):
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, d, step):
        yield slice(start, min(d, start + step))


def _krum_scores(sq_dists: np.ndarray, num_neighbors: int) -> np.ndarray:
    """Sum of the ``num_neighbors`` smallest squared distances to OTHER rows."""
    n = sq_dists.shape[0]
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(sq_dists[i], i)
        scores[i] = np.sort(others)[:num_neighbors].sum()
    return scores


# --------------------------------------------------------------------------- rules


def mean(U: Any, weights: Any = None) -> AggregationOutcome:
    """Plain (optionally example-weighted) average: FedAvg (McMahan et al., AISTATS 2017).

    ``weights`` (e.g. number of examples) default to uniform.  ``outcome.weights`` are the
    normalised coefficients.
    """
    U = _as_updates(U)
    n = U.shape[0]
    w = _client_weights(weights, n)
    return AggregationOutcome(
        delta=w @ U,
        weights=w,
        kept=np.ones(n, dtype=bool),
        info={"num_kept": n},
        arrays={"scale": np.ones(n)},
    )


def krum(
    U: Any, num_malicious: int, multi_k: int = 1, weights: Any = None, strict: bool = True
) -> AggregationOutcome:
    """Krum / Multi-Krum (Blanchard et al., NeurIPS 2017).

    Score of client i = sum of squared L2 distances to its ``n - f - 2`` nearest other
    updates (``f = num_malicious``); requires ``n > 2f + 2``.  Krum (``multi_k == 1``)
    returns the single lowest-score update; Multi-Krum (``multi_k > 1``) averages the
    ``multi_k`` lowest-score updates (ties broken by client index).  The paper's Multi-Krum
    average is unweighted (default); pass ``weights`` (num examples) to weight the selected
    updates like Flower's ``MultiKrum`` does.

    ``strict=False`` relaxes the requirement to ``n >= f + 3`` (at least one neighbour), for
    reproducing papers that ran Krum beyond its guarantee (e.g. 4 attackers among 10
    sampled clients); Flower's Krum does not check at all.

    arrays: ``"scores"`` (n,) Krum scores, ``"scale"`` ones.
    info: ``num_selected``, ``num_neighbors``, ``num_malicious``.
    """
    U = _as_updates(U)
    n = U.shape[0]
    f = int(num_malicious)
    if f < 0:
        raise ValueError(f"num_malicious must be >= 0; got {num_malicious}")
    if strict and n <= 2 * f + 2:
        raise ValueError(
            f"krum needs n_clients > 2*num_malicious + 2, i.e. num_malicious <= {(n - 3) // 2} "
            f"for n_clients={n}; got num_malicious={f} (strict=False allows up to {n - 3})"
        )
    if n < f + 3:
        raise ValueError(f"krum needs num_malicious <= n_clients - 3 = {n - 3}; got num_malicious={f}")
    k = int(multi_k)
    if not 1 <= k <= n:
        raise ValueError(f"multi_k must be in [1, n_clients={n}]; got {multi_k}")
    base_w = _client_weights(weights, n)

    num_neighbors = n - f - 2
    scores = _krum_scores(_pairwise_sq_dists(U), num_neighbors)
    selected = np.argsort(scores, kind="stable")[:k]
    kept = np.zeros(n, dtype=bool)
    kept[selected] = True
    w = np.where(kept, base_w, 0.0)
    w = w / w.sum() if w.sum() > 0 else np.where(kept, 1.0 / k, 0.0)
    return AggregationOutcome(
        delta=w @ U,
        weights=w,
        kept=kept,
        info={"num_selected": k, "num_neighbors": num_neighbors, "num_malicious": f},
        arrays={"scores": scores, "scale": np.ones(n)},
    )


def bulyan(U: Any, num_malicious: int) -> AggregationOutcome:
    """Bulyan (El Mhamdi et al., ICML 2018) with Krum as the selection rule.

    1. Selection: ``theta = n - 2f`` updates are chosen by applying Krum repeatedly to the
       remaining set (each pick is removed and scores are recomputed on the rest, with
       ``max(1, n_remaining - f - 2)`` neighbours -- the inner steps cannot satisfy Krum's
       own ``n > 2f + 2`` once the set shrinks; this matches the paper's recursion and
       Flower's legacy ``aggregate_bulyan``).
    2. Per coordinate, average the ``beta = theta - 2f`` selected values closest to the
       coordinate-wise median of the selected set (ties by selection order).

    Requires ``n >= 4f + 3``.  ``kept`` marks the theta selected clients; ``weights[i]`` is
    client i's per-coordinate coefficient (1/beta when among the beta closest) averaged over
    coordinates.  arrays: ``"scores"`` Krum scores on the full set, ``"selection_order"``
    (theta,) indices in the order picked, ``"scale"`` ones.  info: ``theta``, ``beta``.
    """
    U = _as_updates(U)
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

    sq = _pairwise_sq_dists(U)
    full_scores = _krum_scores(sq, max(1, min(n - 1, n - f - 2)))
    remaining = list(range(n))
    order: list[int] = []
    for _ in range(theta):
        m = len(remaining)
        if m == 1:
            pick = remaining[0]
        else:
            sub = sq[np.ix_(remaining, remaining)]
            s = _krum_scores(sub, max(1, min(m - 1, m - f - 2)))
            pick = remaining[int(np.argmin(s))]
        order.append(pick)
        remaining.remove(pick)

    sel = np.asarray(order)
    S = U[sel]
    delta = np.empty(d)
    counts = np.zeros(theta)
    for cols in _column_chunks(theta, d):
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


def coordinate_median(U: Any) -> AggregationOutcome:
    """Coordinate-wise median (Yin et al., ICML 2018); same as ``np.median(U, axis=0)``.

    For even n the two middle values are averaged.  ``weights[i]`` = client i's median
    coefficient (1 for odd n, 1/2 for each middle value for even n) averaged over
    coordinates; ties in value are attributed by client index.  ``kept`` is all True.
    """
    U = _as_updates(U)
    n, d = U.shape
    delta = np.empty(d)
    counts = np.zeros(n)
    for cols in _column_chunks(n, d):
        block = U[:, cols]
        order = np.argsort(block, axis=0, kind="stable")
        srt = np.take_along_axis(block, order, axis=0)
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


def trimmed_mean(U: Any, beta: float) -> AggregationOutcome:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018).

    Per coordinate, drop the ``k = floor(beta * n)`` smallest and ``k`` largest values and
    average the rest (same rule as ``scipy.stats.trim_mean`` and Flower's FedTrimmedAvg).
    ``beta`` must be in ``[0, 0.5)``.  ``weights[i]`` = fraction of coordinates where client
    i survived, divided by ``n - 2k``.  ``kept`` is all True.  info: ``num_trimmed_per_side``.
    """
    U = _as_updates(U)
    n, d = U.shape
    b = float(beta)
    if not 0.0 <= b < 0.5:
        raise ValueError(f"beta (fraction trimmed from each side) must be in [0, 0.5); got {beta}")
    k = int(b * n)
    m = n - 2 * k
    delta = np.empty(d)
    counts = np.zeros(n)
    for cols in _column_chunks(n, d):
        block = U[:, cols]
        order = np.argsort(block, axis=0, kind="stable")
        srt = np.take_along_axis(block, order, axis=0)
        delta[cols] = srt[k : n - k].mean(axis=0)
        counts += np.bincount(order[k : n - k].ravel(), minlength=n)
    return AggregationOutcome(
        delta=delta,
        weights=counts / (m * d),
        kept=np.ones(n, dtype=bool),
        info={"num_trimmed_per_side": k, "beta": b},
        arrays={"scale": np.ones(n)},
    )


def norm_clip(U: Any, max_norm: float, weights: Any = None) -> AggregationOutcome:
    """Norm clipping (Sun et al., 2019, "Can you really backdoor federated learning?").

    Each update is scaled by ``min(1, max_norm / ||u_i||)`` and the clipped updates are
    averaged with ``weights`` (default uniform).  arrays: ``"scale"`` (clip factors),
    ``"norms"`` (norms before clipping).  info: ``max_norm``, ``num_clipped``.
    """
    U = _as_updates(U)
    n = U.shape[0]
    c = float(max_norm)
    if not (np.isfinite(c) and c > 0):
        raise ValueError(f"max_norm must be a finite number > 0; got {max_norm}")
    w = _client_weights(weights, n)
    norms = _row_norms(U)
    scale = np.where(norms > c, c / np.where(norms > 0, norms, 1.0), 1.0)
    return AggregationOutcome(
        delta=(w * scale) @ U,
        weights=w,
        kept=np.ones(n, dtype=bool),
        info={"max_norm": c, "num_clipped": int(np.sum(norms > c))},
        arrays={"scale": scale, "norms": norms},
    )


def _gaussian(rng: np.random.Generator | None, std: float, d: int, mask: np.ndarray | None) -> np.ndarray:
    if std == 0.0:
        return np.zeros(d)
    if rng is None:
        raise ValueError("rng (numpy.random.Generator) is required when the noise std is > 0")
    noise = rng.normal(0.0, std, size=d)
    if mask is not None:
        noise[~mask] = 0.0
    return noise


def weak_dp(
    U: Any,
    max_norm: float,
    noise_std: float,
    rng: np.random.Generator | None,
    weights: Any = None,
    noise_mask: Any = None,
) -> AggregationOutcome:
    """Weak differential privacy (Sun et al., 2019): norm clipping + Gaussian noise.

    ``delta = norm_clip(U, max_norm, weights).delta + N(0, noise_std^2 I)``.  The noise is
    added ONCE to the aggregate, per coordinate, with standard deviation exactly
    ``noise_std`` (not multiplied by ``max_norm`` and not divided by n).  Since the server
    applies ``global += server_lr * delta``, the noise that reaches the model has std
    ``server_lr * noise_std``; Sun et al. add N(0, sigma^2) to the model itself, so use
    ``noise_std = sigma / server_lr`` to reproduce them.  ``noise_mask`` (bool (d,), default
    all True) restricts the noise to some coordinates (e.g. exclude BatchNorm statistics,
    where noise can make running_var negative).  info adds ``noise_std``.
    """
    base = norm_clip(U, max_norm, weights)
    s = float(noise_std)
    if not (np.isfinite(s) and s >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0; got {noise_std}")
    d = base.delta.shape[0]
    mask = _mask(noise_mask, d, "noise_mask")
    base.delta = base.delta + _gaussian(rng, s, d, mask)
    base.info["noise_std"] = s
    return base


def geometric_median(
    U: Any,
    weights: Any = None,
    iters: int = 100,
    eps: float = 1e-6,
    tol: float = 1e-6,
) -> AggregationOutcome:
    """Geometric median by smoothed Weiszfeld: RFA (Pillutla, Kakade & Harchaoui, IEEE TSP 2022).

    Minimises ``sum_i a_i * max(eps, ||z - u_i||)`` approximately: start at the weighted
    mean, then repeat ``b_i = a_i / max(eps, ||z - u_i||)``, ``z = sum b_i u_i / sum b_i``
    for at most ``iters`` iterations, stopping early when the objective
    ``sum_i a_i ||z - u_i||`` changes by at most ``tol`` relative to its value.
    ``a`` = ``weights`` (num examples; default uniform).  The official RFA code uses 5
    "communication passes" (= ``iters=4``, no early stop: ``tol=0``) and smoothing 1e-6;
    the default here runs to convergence.

    ``weights`` in the outcome are the final normalised Weiszfeld coefficients b, so
    ``delta == weights @ U``.  ``kept`` all True.  info: ``iterations``, ``objective``,
    ``converged``.
    """
    U = _as_updates(U)
    n = U.shape[0]
    if int(iters) < 0:
        raise ValueError(f"iters must be >= 0; got {iters}")
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps (smoothing) must be > 0; got {eps}")
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be >= 0; got {tol}")
    a = _client_weights(weights, n)

    def dists(z: np.ndarray) -> np.ndarray:
        return np.array([np.linalg.norm(U[i] - z) for i in range(n)])

    b = a.copy()
    z = b @ U
    dist = dists(z)
    obj = float(a @ dist)
    converged = False
    it = 0
    for it in range(1, int(iters) + 1):
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
        info={"iterations": it, "objective": obj, "converged": converged},
        arrays={"scale": np.ones(n)},
    )


def foolsgold(
    U: Any,
    history: Any = None,
    confidence: float = 1.0,
    similarity_mask: Any = None,
    normalize: bool = True,
    epsilon: float = 1e-5,
) -> AggregationOutcome:
    """FoolsGold (Fung, Yoon & Beschastnikh, RAID 2020).

    ``history`` (n, h) holds each client's accumulated past updates, row-aligned with ``U``
    (zeros / None for clients never seen); ``h = d`` or, with ``similarity_mask`` (bool (d,),
    e.g. only the output layer), ``h = mask.sum()``.  This call adds the current updates:
    ``new_history = history + U[:, mask]``, returned as ``arrays["history"]``; the caller
    stores each row back under the client's partition id.

    Weights follow the reference implementation: cosine similarity of the histories
    (self excluded), pardoning (``cs_ij *= maxcs_i / maxcs_j`` when ``maxcs_i < maxcs_j``, with
    ``epsilon`` added to maxcs), ``wv = clip(1 - max_j cs_ij, 0, 1)``, rescale by max, set 1 ->
    0.99, logit ``confidence * (ln(wv / (1 - wv)) + 0.5)`` for wv > 0, clip to [0, 1].
    Identical sybils get 0 (values of ``1 - max cs`` below 1e-12 are treated as 0, which
    removes rounding noise).  If every score is 0 (all clients identical) the delta is 0
    (the reference code returns NaN there).

    Aggregate: ``normalize=True`` -> ``sum wv_i u_i / sum wv_i`` (scale comparable to the
    mean); ``normalize=False`` -> ``sum wv_i u_i / n`` (the "1/n" variant used by several
    backdoor benchmarks; the original FedSGD code returns the un-normalised sum).
    ``outcome.weights`` are the coefficients actually applied; ``arrays["scores"]`` the raw
    FoolsGold weights in [0, 1].  ``kept = scores > 0``.
    """
    U = _as_updates(U)
    n, d = U.shape
    mask = _mask(similarity_mask, d, "similarity_mask")
    feats = U if mask is None else U[:, mask]
    h = feats.shape[1]
    if history is None:
        hist = np.zeros((n, h))
    else:
        hist = np.asarray(history, dtype=np.float64)
        if hist.shape != (n, h):
            raise ValueError(f"history must have shape ({n}, {h}) (n_clients, masked d); got {hist.shape}")
    if not (np.isfinite(confidence) and confidence > 0):
        raise ValueError(f"confidence (kappa) must be > 0; got {confidence}")
    if not (np.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be >= 0; got {epsilon}")
    new_hist = hist + feats

    # As in the reference code, the diagonal of cs is cos(i, i) - 1 (= 0 for a non-zero row)
    # and takes part in the maxima.
    cs = _cosine_similarity(new_hist) - np.eye(n)
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
    scores = wv

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


def robust_lr(
    U: Any,
    threshold: float,
    server_lr: float = 1.0,
    weights: Any = None,
    mask: Any = None,
) -> AggregationOutcome:
    """Robust learning rate, RLR (Ozdayi, Kantarcioglu & Gel, AAAI 2021).

    ``agree_j = |sum_i sign(u_ij)|`` (unweighted, sign(0) = 0).  Per coordinate the learning
    rate is ``-server_lr`` if ``agree_j < threshold`` else ``+server_lr``, and
    ``delta = lr ⊙ mean_w(U)`` with ``mean_w`` the ``weights``-weighted mean (the authors
    weight by data size).  So with the default ``server_lr=1`` the result is the mean with
    the disputed coordinates sign-flipped, and the server's own ``server_lr`` then scales it
    exactly as in the paper (``global += eta * lr_sign ⊙ mean``).  Do not pass the server
    lr here AND apply it again in the server.  ``mask`` (bool (d,)) restricts RLR to some
    coordinates (e.g. exclude BatchNorm statistics); others use ``+server_lr``.
    ``threshold`` must be in [0, n]; 0 disables flipping.

    ``weights`` in the outcome = averaging weights; ``kept`` all True.
    arrays: ``"lr"`` (d,) per-coordinate learning rate.  info: ``num_flipped``,
    ``fraction_flipped`` (over the masked coordinates), ``threshold``.
    """
    U = _as_updates(U)
    n, d = U.shape
    t = float(threshold)
    if not 0.0 <= t <= n:
        raise ValueError(f"threshold must be in [0, n_clients={n}]; got {threshold}")
    lr = float(server_lr)
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"server_lr must be > 0; got {server_lr}")
    m = _mask(mask, d, "mask")
    w = _client_weights(weights, n)
    agree = np.abs(np.sign(U).sum(axis=0))
    flip = agree < t
    if m is not None:
        flip &= m
    lr_vec = np.where(flip, -lr, lr)
    considered = d if m is None else int(m.sum())
    n_flip = int(flip.sum())
    return AggregationOutcome(
        delta=lr_vec * (w @ U),
        weights=w,
        kept=np.ones(n, dtype=bool),
        info={
            "num_flipped": n_flip,
            "fraction_flipped": n_flip / considered if considered else 0.0,
            "threshold": t,
            "server_lr": lr,
        },
        arrays={"lr": lr_vec, "scale": np.ones(n)},
    )


def fltrust(U: Any, server_update: Any) -> AggregationOutcome:
    """FLTrust (Cao, Fang, Liu & Gong, NDSS 2021).

    ``g0`` = the server's update on its root dataset.  Trust score
    ``TS_i = ReLU(cos(u_i, g0))`` (0 for a zero update), each update is rescaled to
    ``||g0||`` and ``delta = sum TS_i * (||g0|| / ||u_i||) u_i / sum TS_i``; all-zero trust
    gives a zero delta.  ``weights`` = ``TS / sum TS``; ``kept = TS > 0``.
    arrays: ``"scores"`` trust scores, ``"scale"`` = ``||g0|| / ||u_i||`` (0 for zero updates).
    info: ``server_update_norm``, ``num_kept``.
    """
    U = _as_updates(U)
    n, d = U.shape
    g0 = np.asarray(server_update, dtype=np.float64).reshape(-1)
    if g0.shape != (d,):
        raise ValueError(f"server_update must have shape ({d},); got {g0.shape}")
    if not np.all(np.isfinite(g0)):
        raise ValueError("server_update must contain only finite values")
    g_norm = float(np.linalg.norm(g0))
    norms = _row_norms(U)
    ok = norms > 0
    cos = np.zeros(n)
    if g_norm > 0:
        cos[ok] = (U[ok] @ g0) / (norms[ok] * g_norm)
    ts = np.clip(cos, 0.0, 1.0)
    scale = np.where(ok, g_norm / np.where(ok, norms, 1.0), 0.0)
    total = ts.sum()
    w = ts / total if total > 0 else np.zeros(n)
    return AggregationOutcome(
        delta=(w * scale) @ U,
        weights=w,
        kept=ts > 0,
        info={"server_update_norm": g_norm, "num_kept": int(np.sum(ts > 0))},
        arrays={"scores": ts, "scale": scale},
    )


def flame(
    U: Any,
    clustering_mask: Any,
    noise_lambda: float,
    rng: np.random.Generator | None,
    min_cluster_size: int | None = None,
    min_samples: int = 1,
    noise_mask: Any = None,
    global_params: Any = None,
) -> AggregationOutcome:
    """FLAME (Nguyen et al., USENIX Security 2022).

    1. Cosine distances ``1 - cos`` between the rows of ``U[:, clustering_mask]`` (pass a
       mask that excludes BatchNorm statistics; None = all coordinates).  If
       ``global_params`` (d,) is given the distances are computed on the local models
       ``global_params + U`` instead (FLAME's Algorithm 1 clusters models W_i; most
       re-implementations cluster updates, the default here).
    2. ``sklearn.cluster.HDBSCAN(metric="precomputed", min_cluster_size=n//2 + 1,
       min_samples=min_samples + 1, allow_single_cluster=True)``.  ``min_samples`` uses the
       convention of the FLAME paper / ``hdbscan`` library (neighbours NOT counting the point
       itself); scikit-learn counts the point itself, hence the +1 (see the sklearn HDBSCAN
       notes).  ``allow_single_cluster`` is required: with ``min_cluster_size > n/2`` at most
       one cluster can exist.  The largest cluster is kept; noise points (label -1) are
       rejected.  If everything is labelled noise (or n == 1), all clients are kept
       (``info["all_noise"] = True``), as in common FLAME re-implementations.
    3. ``S_t`` = median L2 norm of ALL n updates (full vectors); kept updates are scaled by
       ``min(1, S_t / ||u_i||)`` and averaged (unweighted).
    4. Gaussian noise with std ``noise_lambda * S_t`` per coordinate (``noise_mask`` bool (d,)
       restricts it, e.g. to non-BatchNorm entries).  lambda = 0.001 for image
       classification in the paper.  FLAME adds the noise to the model; here it is in the
       delta, so the model sees ``server_lr * noise`` (divide lambda by server_lr to match).

    ``weights`` = 1/|kept| on kept clients.  arrays: ``"labels"`` HDBSCAN labels,
    ``"scale"`` clip factors, ``"norms"``.  info: ``cluster_size``, ``num_clusters``,
    ``clip_norm`` (S_t), ``noise_std``, ``all_noise``, ``num_clipped``.
    """
    U = _as_updates(U)
    n, d = U.shape
    cmask = _mask(clustering_mask, d, "clustering_mask")
    nmask = _mask(noise_mask, d, "noise_mask")
    lam = float(noise_lambda)
    if not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"noise_lambda must be a finite number >= 0; got {noise_lambda}")
    mcs = n // 2 + 1 if min_cluster_size is None else int(min_cluster_size)
    if n >= 2 and not 2 <= mcs <= n:
        raise ValueError(f"min_cluster_size must be in [2, n_clients={n}]; got {min_cluster_size}")
    ms = int(min_samples)
    if n >= 2 and not 1 <= ms <= n - 1:
        raise ValueError(f"min_samples must be in [1, n_clients - 1 = {n - 1}]; got {min_samples}")

    X = U if global_params is None else U + np.asarray(global_params, dtype=np.float64).reshape(1, -1)
    if X.shape != U.shape:
        raise ValueError(f"global_params must have shape ({d},)")
    if cmask is not None:
        X = X[:, cmask]

    if n >= 2:
        from sklearn.cluster import HDBSCAN  # local import: sklearn is slow to import

        dist = 1.0 - _cosine_similarity(X)
        dist = np.clip(0.5 * (dist + dist.T), 0.0, 2.0)
        np.fill_diagonal(dist, 0.0)
        kwargs: dict[str, Any] = dict(
            min_cluster_size=mcs,
            min_samples=ms + 1,
            metric="precomputed",
            allow_single_cluster=True,
        )
        if "copy" in HDBSCAN().get_params():  # scikit-learn >= 1.5 warns unless it is explicit
            kwargs["copy"] = True
        labels = HDBSCAN(**kwargs).fit(dist).labels_
    else:
        labels = np.full(n, -1)
    labels = np.asarray(labels, dtype=int)
    cluster_ids = [c for c in np.unique(labels) if c >= 0]
    if cluster_ids:
        sizes = [int(np.sum(labels == c)) for c in cluster_ids]
        best = cluster_ids[int(np.argmax(sizes))]
        kept = labels == best
        all_noise = False
    else:
        kept = np.ones(n, dtype=bool)
        all_noise = True

    norms = _row_norms(U)
    s_t = float(np.median(norms))
    scale = np.where(norms > s_t, s_t / np.where(norms > 0, norms, 1.0), 1.0)
    w = kept / kept.sum()
    sigma = lam * s_t
    delta = (w * scale) @ U + _gaussian(rng, sigma, d, nmask)
    return AggregationOutcome(
        delta=delta,
        weights=w,
        kept=kept,
        info={
            "cluster_size": int(kept.sum()),
            "num_clusters": len(cluster_ids),
            "clip_norm": s_t,
            "noise_std": sigma,
            "all_noise": all_noise,
            "num_clipped": int(np.sum(kept & (norms > s_t))),
            "min_cluster_size": mcs,
        },
        arrays={"labels": labels, "scale": scale, "norms": norms},
    )


# --------------------------------------------------------------------------- metrics


def detection_scores(kept: Any, malicious: Any) -> dict[str, Any]:
    """Precision / recall / F1 of REJECTION (positive = rejected client).

    TP = rejected malicious, FP = rejected benign, FN = kept malicious, TN = kept benign.
    Undefined ratios (0/0) are ``None`` (never NaN), specifically:
    precision is None when nothing was rejected; recall is None when there is no malicious
    client; F1 is None when precision or recall is None, and 0 when both are 0.
    Also returns the counts and ``rejection_rate`` (rejected / n), ``false_positive_rate``
    (FP / benign, None without benign clients).  To summarise many rounds, sum the counts
    and recompute the ratios rather than averaging per-round ratios.
    """
    k = np.asarray(kept, dtype=bool).reshape(-1)
    m = np.asarray(malicious, dtype=bool).reshape(-1)
    if k.shape != m.shape:
        raise ValueError(f"kept and malicious must have the same length; got {k.shape} and {m.shape}")
    rejected = ~k
    tp = int(np.sum(rejected & m))
    fp = int(np.sum(rejected & ~m))
    fn = int(np.sum(k & m))
    tn = int(np.sum(k & ~m))
    precision = tp / (tp + fp) if (tp + fp) > 0 else None
    recall = tp / (tp + fn) if (tp + fn) > 0 else None
    if precision is None or recall is None:
        f1 = None
    elif precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    n = int(k.size)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "num_rejected": tp + fp,
        "num_malicious": tp + fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "rejection_rate": (tp + fp) / n if n else None,
        "false_positive_rate": fp / (fp + tn) if (fp + tn) > 0 else None,
    }


# --------------------------------------------------------------------------- state helpers


def flatten_state(states: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None) -> np.ndarray:
    """Stack state dicts into a float64 matrix (n, d): entries ``keys`` (default: the first
    state's key order) raveled and concatenated in that order.  Values may be numpy arrays
    or CPU tensors (anything ``np.asarray`` accepts)."""
    if len(states) == 0:
        raise ValueError("states must contain at least one state dict")
    ks = list(states[0].keys()) if keys is None else list(keys)
    rows = []
    for s in states:
        parts = [np.asarray(s[k], dtype=np.float64).ravel() for k in ks]
        rows.append(np.concatenate(parts) if parts else np.zeros(0))
    return np.stack(rows)


def unflatten(vec: Any, template: Mapping[str, Any], keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten_state` for one row: split ``vec`` into arrays shaped and typed
    like ``template[k]`` for ``k`` in ``keys`` (default: template order).  Integer / bool
    entries (e.g. ``num_batches_tracked``) are rounded before the cast."""
    v = np.asarray(vec, dtype=np.float64).reshape(-1)
    ks = list(template.keys()) if keys is None else list(keys)
    out: dict[str, np.ndarray] = {}
    pos = 0
    for k in ks:
        ref = np.asarray(template[k])
        size = int(ref.size)
        if pos + size > v.size:
            raise ValueError(f"vec is too short for template: needs more than {v.size} values at key {k!r}")
        chunk = v[pos : pos + size].reshape(ref.shape)
        if np.issubdtype(ref.dtype, np.integer) or ref.dtype == np.bool_:
            chunk = np.rint(chunk)
        out[k] = chunk.astype(ref.dtype)
        pos += size
    if pos != v.size:
        raise ValueError(f"vec has {v.size} values but the template needs {pos}")
    return out


def bn_statistic_mask(template: Mapping[str, Any], keys: Sequence[str] | None = None) -> np.ndarray:
    """Boolean (d,) mask, aligned with :func:`flatten_state`, that is True on BatchNorm
    statistics (entries whose name ends with running_mean / running_var /
    num_batches_tracked).  Use ``~mask`` for FLAME's clustering or as a noise mask."""
    ks = list(template.keys()) if keys is None else list(keys)
    parts = []
    for k in ks:
        size = int(np.asarray(template[k]).size)
        is_bn = k.rsplit(".", 1)[-1] in BN_STATISTIC_SUFFIXES
        parts.append(np.full(size, is_bn, dtype=bool))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
