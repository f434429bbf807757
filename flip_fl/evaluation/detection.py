"""Detection metrics: a defense's rejections read as detection of the attacking clients."""

from __future__ import annotations

from typing import Any

import numpy as np


def detection_scores(kept: Any, malicious: Any) -> dict[str, Any]:
    """Precision / recall / F1 of REJECTION (positive = rejected client).

    TP = rejected malicious, FP = rejected benign, FN = kept malicious, TN = kept benign.
    Undefined ratios (0/0) are `None` (never NaN), specifically:
    precision is None when nothing was rejected; recall is None when there is no malicious
    client; F1 is None when precision or recall is None, and 0 when both are 0.
    Also returns the counts and `rejection_rate` (rejected / n), `false_positive_rate`
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
    precision, recall = precision_recall(tp, fp, fn)
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


def precision_recall(tp: int, fp: int, fn: int) -> tuple[float | None, float | None]:
    """Precision tp / (tp + fp) and recall tp / (tp + fn) of rejection; None where undefined (0/0)."""
    precision = tp / (tp + fp) if (tp + fp) > 0 else None
    recall = tp / (tp + fn) if (tp + fn) > 0 else None
    return precision, recall
