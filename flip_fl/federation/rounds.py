"""What happened on the client side of a round: who was sampled and attacked, failures, client metrics.

The strategy fills a `RoundRecord` per round; `round_fields` turns it into that round's part of the
metrics line (`metrics.jsonl`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flip_fl.federation.failures import short_reason


@dataclass
class RoundRecord:
    """What happened on the client side of one round (merged into that round's metrics line)."""

    sampled: list[int]
    malicious: list[int]
    attacking: list[int]
    started: float
    reasons: dict[int, str] = field(default_factory=dict)
    """Failed partition -> the full reason (a client's traceback, a malformed reply, no reply)."""
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def failed(self) -> list[int]:
        """The failed partitions, in order."""
        return sorted(self.reasons)

    @property
    def failures(self) -> int:
        """How many sampled clients failed."""
        return len(self.reasons)

    @property
    def errors(self) -> list[str]:
        """One `client P: reason` line per failed client (the metrics line's `errors`)."""
        return [f"client {p}: {short_reason(self.reasons[p])}" for p in self.failed]


def round_fields(record: RoundRecord | None) -> dict[str, Any]:
    """The client-side facts of a round for its metrics line (empty lists for round 0, which has no record)."""
    if record is None:
        return {"sampled": [], "malicious": [], "attacking": [], "failures": 0}
    metrics = record.client_metrics
    keys = sorted({k for m in metrics.values() for k in m})
    means = {f"client_{k}": float(np.mean([m[k] for m in metrics.values() if k in m])) for k in keys}
    return {"sampled": record.sampled, "malicious": record.malicious, "attacking": record.attacking,
            "attack_round": bool(record.attacking), "failures": record.failures, "failed": record.failed,
            "errors": record.errors, **means, "client_metrics": {str(p): m for p, m in sorted(metrics.items())},
            **record.extra}
