"""Coordinate-wise defenses with Flower's own rules: median (FedMedian) and trimmed mean (FedTrimmedAvg).

Flower aggregates client MODELS; coordinate medians and trimmed means are translation invariant, so on
models they equal global + (the same rule on the updates). The per-client weight reported for detection
is the share of coordinates taken from that client, computed with `flip_fl.defenses` outside the timing.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg

from flip_fl.config import Config
from flip_fl.defenses.median import coordinate_median
from flip_fl.defenses.trimmed_mean import trimmed_mean
from strategies.defense import Decision, DefenseStrategy


class MedianDefense(DefenseStrategy, FedMedian):
    """Coordinate-wise median (Yin et al. 2018), Flower's FedMedian (unweighted)."""

    name = "median"

    def collect_evidence(self, replies: list[Message]) -> np.ndarray:
        return self.client_updates(replies)

    def explain(self, evidence: np.ndarray) -> Decision:
        return Decision(weights=coordinate_median(evidence).weights)


class TrimmedMeanDefense(DefenseStrategy, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Yin et al. 2018), Flower's FedTrimmedAvg with beta = defense.trim_beta."""

    name = "trimmed_mean"

    def __init__(self, cfg: Config, node_partitions: dict[int, int], base_config: dict[str, str]) -> None:
        super().__init__(cfg, node_partitions, base_config, beta=cfg.defense.trim_beta)

    def collect_evidence(self, replies: list[Message]) -> np.ndarray:
        return self.client_updates(replies)

    def explain(self, evidence: np.ndarray) -> Decision:
        outcome = trimmed_mean(evidence, self.cfg.defense.trim_beta)
        return Decision(weights=outcome.weights, info={"num_trimmed_per_side": outcome.info["num_trimmed_per_side"]})
