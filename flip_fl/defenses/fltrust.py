"""FLTrust (Cao, Fang, Liu & Gong, NDSS 2021): trust = ReLU(cos(update, server update)), updates rescaled.

The server's root dataset is a seeded draw of test images (`root_split`), held out of evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.defenses.common import AggregationOutcome, as_updates, row_norms
from flip_fl.seeds import FLTRUST_ROOT, numpy_rng


def fltrust(U: Any, server_update: Any) -> AggregationOutcome:
    """FLTrust (Cao, Fang, Liu & Gong, NDSS 2021).

    `g0` = the server's update on its root dataset.  Trust score
    `TS_i = ReLU(cos(u_i, g0))` (0 for a zero update), each update is rescaled to
    `||g0||` and `delta = sum TS_i * (||g0|| / ||u_i||) u_i / sum TS_i`; all-zero trust
    gives a zero delta.  `weights` = `TS / sum TS`; `kept = TS > 0`.
    arrays: `"scores"` trust scores, `"scale"` = `||g0|| / ||u_i||` (0 for zero updates).
    info: `server_update_norm`, `num_kept`.
    """
    U = as_updates(U)
    n, d = U.shape
    g0 = np.asarray(server_update, dtype=np.float64).reshape(-1)
    if g0.shape != (d,):
        raise ValueError(f"server_update must have shape ({d},); got {g0.shape}")
    if not np.all(np.isfinite(g0)):
        raise ValueError("server_update must contain only finite values")
    g_norm = float(np.linalg.norm(g0))
    norms = row_norms(U)
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


def root_split(seed: int, root_size: int, test_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(root indices, the other indices) of a test set of `test_size` images: a seeded draw of `root_size`."""
    if root_size >= test_size:
        raise ValueError(f"{root_size} root images cannot be held out of a test set of {test_size}")
    order = numpy_rng(seed, FLTRUST_ROOT).permutation(test_size)
    return np.sort(order[:root_size]), np.sort(order[root_size:])
