"""Model states as update vectors, and the server's update rule.

- `flatten_state` / `unflatten`: state dicts <-> float64 rows of the update matrix the rules see;
- `bn_statistic_mask`: which coordinates are BatchNorm statistics (not trained weights);
- `apply_server_lr`: global += eta * (aggregate of client models - global). With a (weighted) mean as the
  aggregate this is eta * mean(client deltas), applied to every state_dict entry including BatchNorm
  buffers. Integer buffers (num_batches_tracked) are rounded back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# state_dict entry suffixes that hold BatchNorm statistics rather than trained weights.
BN_STATISTIC_SUFFIXES: tuple[str, ...] = ("running_mean", "running_var", "num_batches_tracked")


def apply_server_lr(global_state: dict[str, np.ndarray], aggregate: dict[str, np.ndarray],
                    server_lr: float) -> dict[str, np.ndarray]:
    """Global + eta * (aggregate - global), cast back to each entry's dtype (integers rounded)."""
    out = {}
    for k, g in global_state.items():
        new = g.astype(np.float64) + server_lr * (aggregate[k].astype(np.float64) - g.astype(np.float64))
        out[k] = np.rint(new).astype(g.dtype) if np.issubdtype(g.dtype, np.integer) else new.astype(g.dtype)
    return out


def flatten_state(states: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None) -> np.ndarray:
    """Stack state dicts into a float64 matrix (n, d).

    Entries `keys` (default: the first state's key order) are raveled and concatenated in that order.  Values
    may be numpy arrays or CPU tensors (anything `np.asarray` accepts).
    """
    if len(states) == 0:
        raise ValueError("states must contain at least one state dict")
    ks = list(states[0].keys()) if keys is None else list(keys)
    rows = []
    for s in states:
        parts = [np.asarray(s[k], dtype=np.float64).ravel() for k in ks]
        rows.append(np.concatenate(parts) if parts else np.zeros(0))
    return np.stack(rows)


def unflatten(vec: Any, template: Mapping[str, Any], keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Inverse of `flatten_state` for one row.

    Splits `vec` into arrays shaped and typed like `template[k]` for `k` in `keys` (default: template order).
    Integer / bool entries (e.g. `num_batches_tracked`) are rounded before the cast.
    """
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
    """Boolean (d,) mask, aligned with `flatten_state`, that is True on BatchNorm statistics.

    BatchNorm statistics are the entries whose name ends with running_mean / running_var /
    num_batches_tracked).  Use `~mask` for FLAME's clustering or as a noise mask.
    """
    ks = list(template.keys()) if keys is None else list(keys)
    parts = []
    for k in ks:
        size = int(np.asarray(template[k]).size)
        is_bn = k.rsplit(".", 1)[-1] in BN_STATISTIC_SUFFIXES
        parts.append(np.full(size, is_bn, dtype=bool))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
