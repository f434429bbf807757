"""Server-side update rule: global += eta * (aggregate of client models - global).

With a (weighted) mean as the aggregate this is eta * mean(client deltas), applied to every
state_dict entry including BatchNorm buffers. Integer buffers (num_batches_tracked) are rounded back.
"""

from __future__ import annotations

import numpy as np


def weighted_mean(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Entry-wise mean of client states with weights normalised to sum to one."""
    w = np.asarray(weights, dtype=np.float64)
    if len(states) == 0 or w.sum() <= 0:
        raise ValueError("weighted_mean needs at least one state and a positive total weight")
    w = w / w.sum()
    return {k: sum(wi * s[k].astype(np.float64) for wi, s in zip(w, states)) for k in states[0]}


def apply_server_lr(global_state: dict[str, np.ndarray], aggregate: dict[str, np.ndarray],
                    server_lr: float) -> dict[str, np.ndarray]:
    """global + eta * (aggregate - global), cast back to each entry's dtype (integers rounded)."""
    out = {}
    for k, g in global_state.items():
        new = g.astype(np.float64) + server_lr * (aggregate[k].astype(np.float64) - g.astype(np.float64))
        out[k] = np.rint(new).astype(g.dtype) if np.issubdtype(g.dtype, np.integer) else new.astype(g.dtype)
    return out
