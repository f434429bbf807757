"""Coordinate-wise defenses with Flower's own rules: median (FedMedian) and trimmed mean (FedTrimmedAvg).

Flower aggregates client MODELS; coordinate medians and trimmed means are translation invariant, so on
models they equal global + (the same rule on the updates). The per-client weight reported for detection
is the share of coordinates taken from that client, computed with `flip_fl.defenses` outside the timing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg

from flip_fl.defenses.median import coordinate_median
from flip_fl.defenses.trimmed_mean import trimmed_mean
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, DefenseStrategy


@DEFENSES.register("median")
class MedianDefense(DefenseStrategy, FedMedian):
    """Coordinate-wise median (Yin et al. 2018), Flower's FedMedian (unweighted)."""

    name = "median"

    def collect_evidence(self, replies: list[Message]) -> np.ndarray:
        """The update matrix, read before Flower's rule consumes the replies."""
        return self.client_updates(replies)

    def explain(self, evidence: np.ndarray) -> Decision:
        """Each client's share of the coordinates taken from it."""
        return Decision(weights=coordinate_median(evidence).weights)


@DEFENSES.register("trimmed_mean")
class TrimmedMeanDefense(DefenseStrategy, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Yin et al. 2018), Flower's FedTrimmedAvg.

    Args:
        beta: fraction cut from each end per coordinate.
        **kwargs: those of `SeededFedAvg`.
    """

    name = "trimmed_mean"

    def __init__(self, *, beta: float = 0.2, **kwargs: Any) -> None:
        super().__init__(beta=beta, **kwargs)

    def collect_evidence(self, replies: list[Message]) -> np.ndarray:
        """The update matrix, read before Flower's rule consumes the replies."""
        return self.client_updates(replies)

    def explain(self, evidence: np.ndarray) -> Decision:
        """Each client's share of the surviving coordinates."""
        outcome = trimmed_mean(evidence, self.beta)
        return Decision(weights=outcome.weights, info={"num_trimmed_per_side": outcome.info["num_trimmed_per_side"]})
