"""Brute-force references and inputs for the numpy rules of `flip_fl.defenses`, and Flower's own rules to compare with.

The references are plain Python loops, written independently of the production code.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

logging.getLogger("flwr").setLevel(logging.WARNING)


def planted(n_honest: int = 7, d: int = 12, seed: int = 0, scale: float = 1000.0) -> tuple[np.ndarray, np.ndarray]:
    """n_honest updates near (1, ..., 1) plus one huge update (the last row); (U, the honest mean)."""
    rng = np.random.default_rng(seed)
    honest = 1.0 + 0.05 * rng.standard_normal((n_honest, d))
    outlier = np.full((1, d), scale)
    outlier[0, ::2] = -scale  # also a different direction
    return np.vstack([honest, outlier]), honest.mean(axis=0)


def dist2(a: Any, b: Any) -> float:
    """Squared Euclidean distance, by a loop."""
    return sum((float(x) - float(y)) ** 2 for x, y in zip(a, b))


def ref_krum_scores(rows: Any, f: int) -> list[float]:
    """Krum scores: the sum of the max(1, min(n - 1, n - f - 2)) smallest squared distances to the others."""
    n = len(rows)
    scores = []
    for i in range(n):
        ds = sorted(dist2(rows[i], rows[j]) for j in range(n) if j != i)
        scores.append(sum(ds[: max(1, min(n - 1, n - f - 2))]))
    return scores


def ref_sorted_column(U: np.ndarray, j: int) -> list[float]:
    """Column j of U, sorted."""
    return sorted(float(U[i, j]) for i in range(U.shape[0]))


# --------------------------------------------------------------------------- Flower's rules


def flower_legacy() -> Any:
    """`flwr.server.strategy.aggregate` (Flower's legacy aggregation functions), or skip."""
    try:
        from flwr.server.strategy import aggregate as agg
    except ImportError:  # pragma: no cover - depends on the installed flwr
        pytest.skip("flwr.server.strategy.aggregate not importable")
    return agg


def flower_replies(U: np.ndarray, num_examples: Any = None) -> list[Any]:
    """Reply Messages like those a new-style Flower strategy receives, one array each."""
    try:
        from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict
    except ImportError:  # pragma: no cover
        pytest.skip("flwr.app message API not importable")
    out = []
    for i, u in enumerate(U):
        md = Metadata(
            run_id=0,
            message_id=str(i),
            src_node_id=i + 1,
            dst_node_id=0,
            reply_to_message_id="q",
            group_id="",
            created_at=0.0,
            ttl=3600.0,
            message_type="train",
        )
        ne = 1 if num_examples is None else int(num_examples[i])
        content = RecordDict({"arrays": ArrayRecord([u.copy()]), "metrics": MetricRecord({"num-examples": ne})})
        out.append(Message(content=content, metadata=md))
    return out


def flower_new_style(strategy: Any, U: np.ndarray, num_examples: Any = None) -> np.ndarray:
    """A new-style Flower strategy's aggregate of the rows of U."""
    arrays, _ = strategy.aggregate_train(1, flower_replies(U, num_examples))
    return arrays.to_numpy_ndarrays()[0]


def flower_inputs() -> dict[str, np.ndarray]:
    """The update matrices the Flower comparisons use: 11 random rows, and 10 honest rows plus a planted outlier."""
    rng = np.random.default_rng(123)
    random = rng.standard_normal((11, 6)) * rng.uniform(0.5, 3.0, (11, 1))
    U, _ = planted(n_honest=10, d=6)
    return {"random": random, "planted": U}
