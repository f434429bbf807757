"""Norm clipping and weak differential privacy (Sun et al. 2019, "Can you really backdoor federated learning?")."""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import (
    AggregationOutcome,
    as_updates,
    client_weights,
    coordinate_mask,
    gaussian_noise,
    row_norms,
)


def norm_clip(U: Any, max_norm: float, weights: Any = None) -> AggregationOutcome:
    """Norm clipping (Sun et al., 2019, "Can you really backdoor federated learning?").

    Each update is scaled by `min(1, max_norm / ||u_i||)` and the clipped updates are
    averaged with `weights` (default uniform).  arrays: `"scale"` (clip factors),
    `"norms"` (norms before clipping).  info: `max_norm`, `num_clipped`.
    """
    U = as_updates(U)
    n = U.shape[0]
    c = float(max_norm)
    if not (np.isfinite(c) and c > 0):
        raise ValueError(f"max_norm must be a finite number > 0; got {max_norm}")
    w = client_weights(weights, n)
    norms = row_norms(U)
    scale = np.where(norms > c, c / np.where(norms > 0, norms, 1.0), 1.0)
    return AggregationOutcome(
        delta=(w * scale) @ U,
        weights=w,
        kept=np.ones(n, dtype=bool),
        info={"max_norm": c, "num_clipped": int(np.sum(norms > c))},
        arrays={"scale": scale, "norms": norms},
    )


def weak_dp(
    U: Any,
    max_norm: float,
    noise_std: float,
    rng: np.random.Generator | None,
    weights: Any = None,
    noise_mask: Any = None,
) -> AggregationOutcome:
    """Weak differential privacy (Sun et al., 2019): norm clipping + Gaussian noise.

    `delta = norm_clip(U, max_norm, weights).delta + N(0, noise_std^2 I)`.  The noise is
    added ONCE to the aggregate, per coordinate, with standard deviation exactly
    `noise_std` (not multiplied by `max_norm` and not divided by n).  Since the server
    applies `global += server_lr * delta`, the noise that reaches the model has std
    `server_lr * noise_std`; Sun et al. add N(0, sigma^2) to the model itself, so use
    `noise_std = sigma / server_lr` to reproduce them.  `noise_mask` (bool (d,), default
    all True) restricts the noise to some coordinates (e.g. exclude BatchNorm statistics,
    where noise can make running_var negative).  info adds `noise_std`.
    """
    base = norm_clip(U, max_norm, weights)
    s = float(noise_std)
    if not (np.isfinite(s) and s >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0; got {noise_std}")
    d = base.delta.shape[0]
    mask = coordinate_mask(noise_mask, d, "noise_mask")
    base.delta = base.delta + gaussian_noise(rng, s, d, mask)
    base.info["noise_std"] = s
    return base
