"""Robust learning rate, RLR (Ozdayi, Kantarcioglu & Gel, AAAI 2021): sign-disputed coordinates are reversed."""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, client_weights, coordinate_mask


def robust_lr(
    U: Any,
    threshold: float,
    server_lr: float = 1.0,
    weights: Any = None,
    mask: Any = None,
) -> AggregationOutcome:
    """Robust learning rate, RLR (Ozdayi, Kantarcioglu & Gel, AAAI 2021).

    `agree_j = |sum_i sign(u_ij)|` (unweighted, sign(0) = 0).  Per coordinate the learning
    rate is `-server_lr` if `agree_j < threshold` else `+server_lr`, and
    `delta = lr ⊙ mean_w(U)` with `mean_w` the `weights`-weighted mean (the authors
    weight by data size).  So with the default `server_lr=1` the result is the mean with
    the disputed coordinates sign-flipped, and the server's own `server_lr` then scales it
    exactly as in the paper (`global += eta * lr_sign ⊙ mean`).  Do not pass the server
    lr here AND apply it again in the server.  `mask` (bool (d,)) restricts RLR to some
    coordinates (e.g. exclude BatchNorm statistics); others use `+server_lr`.
    `threshold` must be in [0, n]; 0 disables flipping.

    `weights` in the outcome = averaging weights; `kept` all True.
    arrays: `"lr"` (d,) per-coordinate learning rate.  info: `num_flipped`,
    `fraction_flipped` (over the masked coordinates), `threshold`.
    """
    U = as_updates(U)
    n, d = U.shape
    t = float(threshold)
    if not 0.0 <= t <= n:
        raise ValueError(f"threshold must be in [0, n_clients={n}]; got {threshold}")
    lr = float(server_lr)
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"server_lr must be > 0; got {server_lr}")
    m = coordinate_mask(mask, d, "mask")
    w = client_weights(weights, n)
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
