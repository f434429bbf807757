"""FLAME (Nguyen et al., USENIX Security 2022): HDBSCAN on cosine distances, clipping, noise.

1. Cosine distances `1 - cos` between the rows of `U[:, clustering_mask]` (pass a
   mask that excludes BatchNorm statistics; None = all coordinates).  If
   `global_params` (d,) is given the distances are computed on the local models
   `global_params + U` instead (FLAME's Algorithm 1 clusters models W_i; most
   re-implementations cluster updates, the default here).
2. `sklearn.cluster.HDBSCAN(metric="precomputed", min_cluster_size=n//2 + 1,
   min_samples=min_samples + 1, allow_single_cluster=True)`.  `min_samples` uses the
   convention of the FLAME paper / `hdbscan` library (neighbours NOT counting the point
   itself); scikit-learn counts the point itself, hence the +1 (see the sklearn HDBSCAN
   notes).  `allow_single_cluster` is required: with `min_cluster_size > n/2` at most
   one cluster can exist.  The largest cluster is kept; noise points (label -1) are
   rejected.  If everything is labelled noise (or n == 1), all clients are kept
   (`info["all_noise"] = True`), as in common FLAME re-implementations.
3. `S_t` = median L2 norm of ALL n updates (full vectors); kept updates are scaled by
   `min(1, S_t / ||u_i||)` and averaged (unweighted).
4. Gaussian noise with std `noise_lambda * S_t` per coordinate (`noise_mask` bool (d,)
   restricts it, e.g. to non-BatchNorm entries).  lambda = 0.001 for image
   classification in the paper.  FLAME adds the noise to the model; here it is in the
   delta, so the model sees `server_lr * noise` (divide lambda by server_lr to match).

`weights` = 1/|kept| on kept clients.  arrays: `"labels"` HDBSCAN labels,
`"scale"` clip factors, `"norms"`.  info: `cluster_size`, `num_clusters`,
`clip_norm` (S_t), `noise_std`, `all_noise`, `num_clipped`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import (
    AggregationOutcome,
    as_updates,
    coordinate_mask,
    cosine_similarity,
    gaussian_noise,
    row_norms,
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
    """FLAME (Nguyen et al., USENIX Security 2022): cluster, keep the largest cluster, clip, add noise.

    The steps, arrays and info are described in the module docstring.
    """
    U = as_updates(U)
    n, d = U.shape
    cmask = coordinate_mask(clustering_mask, d, "clustering_mask")
    nmask = coordinate_mask(noise_mask, d, "noise_mask")
    lam, mcs, ms = _check_settings(n, noise_lambda, min_cluster_size, min_samples)

    X = U if global_params is None else U + np.asarray(global_params, dtype=np.float64).reshape(1, -1)
    if X.shape != U.shape:
        raise ValueError(f"global_params must have shape ({d},)")
    if cmask is not None:
        X = X[:, cmask]

    labels = cosine_hdbscan(X, mcs, ms) if n >= 2 else np.full(n, -1)
    cluster_ids = [c for c in np.unique(labels) if c >= 0]
    if cluster_ids:
        sizes = [int(np.sum(labels == c)) for c in cluster_ids]
        best = cluster_ids[int(np.argmax(sizes))]
        kept = labels == best
        all_noise = False
    else:
        kept = np.ones(n, dtype=bool)
        all_noise = True

    norms = row_norms(U)
    s_t = float(np.median(norms))
    scale = np.where(norms > s_t, s_t / np.where(norms > 0, norms, 1.0), 1.0)
    w = kept / kept.sum()
    sigma = lam * s_t
    delta = (w * scale) @ U + gaussian_noise(rng, sigma, d, nmask)
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


def cosine_hdbscan(X: np.ndarray, min_cluster_size: int, min_samples: int) -> np.ndarray:
    """HDBSCAN labels (-1 = noise) of the rows of `X` on cosine distances, FLAME's clustering step.

    `min_samples` counts neighbours without the point itself (FLAME / `hdbscan`), hence the +1 for
    scikit-learn; a single cluster is allowed.
    """
    from sklearn.cluster import HDBSCAN  # imported here: scikit-learn is slow to import

    dist = 1.0 - cosine_similarity(X)
    dist = np.clip(0.5 * (dist + dist.T), 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    kwargs: dict[str, Any] = dict(
        min_cluster_size=min_cluster_size,
        min_samples=min_samples + 1,
        metric="precomputed",
        allow_single_cluster=True,
    )
    if "copy" in HDBSCAN().get_params():  # scikit-learn >= 1.5 warns unless it is explicit
        kwargs["copy"] = True
    return np.asarray(HDBSCAN(**kwargs).fit(dist).labels_, dtype=int)


def _check_settings(n: int, noise_lambda: float, min_cluster_size: int | None,
                    min_samples: int) -> tuple[float, int, int]:
    """Validated (lambda, min_cluster_size, min_samples) of FLAME for `n` clients."""
    lam = float(noise_lambda)
    if not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"noise_lambda must be a finite number >= 0; got {noise_lambda}")
    mcs = n // 2 + 1 if min_cluster_size is None else int(min_cluster_size)
    if n >= 2 and not 2 <= mcs <= n:
        raise ValueError(f"min_cluster_size must be in [2, n_clients={n}]; got {min_cluster_size}")
    ms = int(min_samples)
    if n >= 2 and not 1 <= ms <= n - 1:
        raise ValueError(f"min_samples must be in [1, n_clients - 1 = {n - 1}]; got {min_samples}")
    return lam, mcs, ms
