"""What every aggregation rule shares: the outcome type, input checks and matrix helpers.

Every rule takes the clients' UPDATES (`delta_i = local_i - global`) stacked as a
float matrix `U` of shape `(n_clients, d)` and returns an
`AggregationOutcome`.  The caller applies `global += server_lr * outcome.delta`.

Conventions shared by all rules:

* `outcome.delta`   (d,) float64: the aggregate update (noise included where a rule adds
  noise).
* `outcome.weights` (n,) float64: the coefficient each client received in the result.
  For rules that average (possibly rescaled) updates, `weights` are the averaging
  coefficients: they sum to 1 over the accepted clients (or are all 0 when nothing is
  accepted) and excluded clients get 0, so that
  `delta == sum_i weights[i] * arrays["scale"][i] * U[i]` (+ noise).
  For coordinate-wise rules (median, trimmed mean, Bulyan's second stage) `weights[i]` is
  client i's coefficient averaged over the d coordinates (e.g. the fraction of coordinates
  where it was the median); they still sum to 1 and a client that is always trimmed gets 0.
  Geometric median reports the final Weiszfeld weights (`delta == weights @ U`).
  RLR reports the plain averaging weights (its sign flip is per coordinate).
* `outcome.kept`    (n,) bool: True if the client was accepted by a client-level
  decision.  Coordinate-wise rules (median, trimmed mean, geometric median, RLR) never
  reject a client as a whole, so they report all True; look at `weights` instead.
* `outcome.info`    dict of JSON-friendly scalars (int / float / bool / None).
* `outcome.arrays`  dict of per-client (or other) numpy arrays, documented per rule
  (e.g. `"scores"`, `"scale"`, `"history"`, `"labels"`).

Invalid arguments raise `ValueError` naming the parameter and the allowed range.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Matrix elements (n * columns) processed at once by the coordinate-wise rules: bounds each
# temporary to about 8 * CHUNK_ELEMENTS bytes (32 MiB) whatever the model size.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class AggregationOutcome:
    """Result of one aggregation rule (see the module docstring for the conventions)."""

    delta: np.ndarray
    weights: np.ndarray
    kept: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def as_updates(U: Any) -> np.ndarray:
    """Validate and convert the update matrix to float64 (n, d)."""
    arr = np.asarray(U, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"U must be a 2-D array (n_clients, d); got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"U must have n_clients >= 1 and d >= 1; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("U must contain only finite values (found NaN or inf)")
    return arr


def client_weights(weights: Any, n: int, name: str = "weights") -> np.ndarray:
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


def coordinate_mask(mask: Any, d: int, name: str) -> np.ndarray | None:
    """Validate an optional boolean coordinate mask of length d."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype != np.bool_ or m.shape != (d,):
        raise ValueError(f"{name} must be a boolean array of shape ({d},); got {m.dtype} {m.shape}")
    return m


def row_norms(U: np.ndarray) -> np.ndarray:
    """L2 norm of every row."""
    return np.sqrt(np.einsum("ij,ij->i", U, U))


def pairwise_sq_dists(U: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows, each summed from the pair's own differences.

    Not the Gram form |a|^2 + |b|^2 - 2<a, b>: that subtracts nearly equal numbers when the rows are
    close next to their size (Flower's Krum on float32 models with small updates picks the wrong
    clients). Differences are exact to float64 rounding whatever the rows share; the cost is
    n(n-1)/2 * d operations over column chunks of bounded memory.
    """
    n, d = U.shape
    upper = np.zeros((n, n))
    for cols in column_chunks(n, d):
        block = U[:, cols]
        for i in range(n - 1):
            diff = block[i + 1:] - block[i]
            upper[i, i + 1:] += np.einsum("ij,ij->i", diff, diff)
    return upper + upper.T


def cosine_similarity(X: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows; a zero row has similarity 0 with everything (as sklearn)."""
    norms = row_norms(X)
    safe = np.where(norms > 0, norms, 1.0)
    Xn = X / safe[:, None]
    cs = Xn @ Xn.T
    return np.clip(cs, -1.0, 1.0)


def column_chunks(n: int, d: int) -> Iterator[slice]:
    """Column slices that bound a block of `n` rows to about `CHUNK_ELEMENTS` elements."""
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, d, step):
        yield slice(start, min(d, start + step))


def sorted_column_blocks(U: np.ndarray) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Per chunk of columns: the columns, the clients' order in each column and the sorted values (stable)."""
    n, d = U.shape
    for cols in column_chunks(n, d):
        block = U[:, cols]
        order = np.argsort(block, axis=0, kind="stable")
        yield cols, order, np.take_along_axis(block, order, axis=0)


def gaussian_noise(rng: np.random.Generator | None, std: float, d: int, mask: np.ndarray | None) -> np.ndarray:
    """Gaussian noise of std `std` on the coordinates of `mask` (all when None); zeros when `std` is 0."""
    if std == 0.0:
        return np.zeros(d)
    if rng is None:
        raise ValueError("rng (numpy.random.Generator) is required when the noise std is > 0")
    noise = rng.normal(0.0, std, size=d)
    if mask is not None:
        noise[~mask] = 0.0
    return noise
