"""Coordinate-wise trimmed mean (Yin et al., ICML 2018)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flip_fl.config import key
from flip_fl.defenses.trimmed_mean import trimmed_mean
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates


@DEFENSES.register("trimmed_mean")
class TrimmedMeanDefense(Defense):
    """Per coordinate, the mean of the updates left when the beta*n smallest and largest are cut (as FedTrimmedAvg).

    The decision's weights are each client's share of the surviving coordinates.

    Args:
        beta: fraction cut from each end per coordinate.
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.trimmed_mean."""

        beta: float = key(0.2, "Fraction cut from each end per coordinate (Flower's default).", ge=0.0, lt=0.5)

    def __init__(self, *, beta: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.beta = beta

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """The per-coordinate trimmed mean update."""
        out = trimmed_mean(updates.matrix, self.beta)
        return out.delta, Decision(weights=out.weights, coordinatewise=True,
                                   info={"num_trimmed_per_side": out.info["num_trimmed_per_side"]})
