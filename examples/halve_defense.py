"""A user defense: the example-weighted mean of the updates kept, times `factor`; outsized updates rejected.

Nothing to register: name the class by its dotted path, with this folder on PYTHONPATH, and give its
parameters under `defense.HalveDefense.*` (its class name):

    PYTHONPATH=examples python sim.py --config configs/quickstart.yaml \
        --set defense.name=halve_defense.HalveDefense --set defense.HalveDefense.factor=0.5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from flip_fl.config import key
from strategies import Decision, Defense, RoundUpdates


class HalveDefense(Defense):
    """Reject updates longer than `max_ratio` x the round's median norm; scale the weighted mean by `factor`."""

    @dataclass
    class Params:
        """defense.HalveDefense."""

        factor: float = key(0.5, "Multiplier of the mean of the kept updates.", gt=0.0, le=1.0)
        max_ratio: float = key(3.0, "Reject an update whose norm exceeds this times the median norm.", ge=1.0)

    def __init__(self, *, factor: float = 0.5, max_ratio: float = 3.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor, self.max_ratio = factor, max_ratio

    def rule(self, updates: RoundUpdates) -> tuple[npt.NDArray[np.float64], Decision]:
        """The scaled example-weighted mean of the kept updates; kept/rejected per client, reported as detection."""
        norms = np.linalg.norm(updates.matrix, axis=1)
        median = float(np.median(norms))
        kept = norms <= self.max_ratio * median  # max_ratio >= 1: the smaller half is always kept
        weights = np.where(kept, updates.weights, 0.0)
        weights = weights / weights.sum()
        info = {"factor": self.factor, "median_norm": median}
        return self.factor * weights @ updates.matrix, Decision(weights=weights, kept=kept, info=info)
