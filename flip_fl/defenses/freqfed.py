"""FreqFed (Fereidooni, Pegoraro, Rieger, Dmitrienko & Sadeghi, NDSS 2024): low-frequency DCT components, HDBSCAN.

1. Frequency analysis: each trained tensor of an update is read as a matrix V of P x Q (P = its first
   dimension, Q = the product of the others; a vector of length P is a P x 1 column) and transformed by
   the 2-D DCT of type II, orthonormal (`scipy.fft.dctn(type=2, norm="ortho")`).
2. Filtering (the `Filtering` of the paper's Algorithm 1, as reconstructed: docs/DEFENSES.md): the
   low-frequency coefficients V[i, j] with i + j <= floor(P / 2), the top-left triangle of V, are kept;
   those of all tensors, concatenated, are the client's vector F. (A column keeps its first floor(P / 2) + 1
   coefficients: the low half of its 1-D DCT.)
3. Model filtering: HDBSCAN on the cosine distances 1 - cos(F_i, F_j), with FLAME's settings (the same
   group's clustering step, `flip_fl.defenses.flame.cosine_hdbscan`: min_cluster_size = n // 2 + 1,
   min_samples 1, a single cluster allowed, so a kept cluster is always a majority). The largest cluster
   is kept, noise points (label -1) are rejected; if everything is noise (or n == 1) every client is kept
   (`info["all_noise"]`), as FLAME here.
4. Aggregation: FedAvg of the kept updates (the given client weights, renormalised over the cluster).

The DCT is linear, so F of an update is F(local model) - F(global model); the paper transforms the local
models' weights, here the updates are transformed (as FLAME here clusters updates): the cosine of the
updates' low-frequency parts, not of the global model's low frequencies plus small differences.

`weights` = the client weights over the kept cluster (0 elsewhere).  arrays: `"labels"` HDBSCAN labels,
`"features"` (n, k) the low-frequency vectors.  info: `cluster_size`, `num_clusters`, `all_noise`,
`num_features` (k), `min_cluster_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, client_weights
from flip_fl.defenses.flame import cosine_hdbscan


def as_matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The P x Q matrix a tensor of `shape` is read as: first dimension by the rest; a vector is a column."""
    dims = [int(s) for s in shape]
    if not dims or any(s < 1 for s in dims):
        raise ValueError(f"tensor shapes must have positive dimensions; got {tuple(dims)}")
    return dims[0], int(np.prod(dims[1:])) if len(dims) > 1 else 1


def low_frequency_mask(rows: int, cols: int) -> np.ndarray:
    """Boolean (rows, cols): the DCT coefficients FreqFed keeps, i + j <= floor(rows / 2)."""
    return np.add.outer(np.arange(rows), np.arange(cols)) <= rows // 2


def low_frequency_features(U: Any, shapes: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(n, k) FreqFed's vectors F: the kept 2-D DCT-II (orthonormal) coefficients of each tensor, concatenated.

    `shapes`: the shapes of the tensors whose raveled entries make up the columns of `U`, in order (None: one
    vector of all d columns).
    """
    from scipy.fft import dctn  # imported here: scipy is slow to import

    U = as_updates(U)
    n, d = U.shape
    layout = [(d,)] if shapes is None else [tuple(s) for s in shapes]
    sizes = [int(np.prod(s)) for s in layout]
    if sum(sizes) != d:
        raise ValueError(f"shapes cover {sum(sizes)} entries but U has d = {d} columns")
    parts = []
    start = 0
    for shape, size in zip(layout, sizes):
        rows, cols = as_matrix_shape(shape)
        block = U[:, start:start + size].reshape(n, rows, cols)
        parts.append(dctn(block, type=2, norm="ortho", axes=(1, 2))[:, low_frequency_mask(rows, cols)])
        start += size
    return np.concatenate(parts, axis=1)


def freqfed(U: Any, shapes: Sequence[Sequence[int]] | None = None, weights: Any = None) -> AggregationOutcome:
    """FreqFed: cluster the low-frequency DCT vectors, average the updates of the largest cluster (module docstring)."""
    U = as_updates(U)
    n = U.shape[0]
    w_all = client_weights(weights, n)
    features = low_frequency_features(U, shapes)
    min_cluster_size = n // 2 + 1
    labels = cosine_hdbscan(features, min_cluster_size, 1) if n >= 2 else np.full(n, -1)
    cluster_ids = [c for c in np.unique(labels) if c >= 0]
    if cluster_ids:
        sizes = [int(np.sum(labels == c)) for c in cluster_ids]
        kept = labels == cluster_ids[int(np.argmax(sizes))]
    else:
        kept = np.ones(n, dtype=bool)
    w = np.where(kept, w_all, 0.0)
    w = w / w.sum() if w.sum() > 0 else kept / kept.sum()
    return AggregationOutcome(
        delta=w @ U,
        weights=w,
        kept=kept,
        info={"cluster_size": int(kept.sum()), "num_clusters": len(cluster_ids), "all_noise": not cluster_ids,
              "num_features": int(features.shape[1]), "min_cluster_size": min_cluster_size},
        arrays={"labels": labels, "features": features},
    )
