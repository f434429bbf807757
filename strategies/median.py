"""Coordinate-wise median (Yin et al., ICML 2018)."""

from __future__ import annotations

from flip_fl.defenses.median import coordinate_median
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates


@DEFENSES.register("median")
class MedianDefense(Defense):
    """Coordinate-wise median of the updates (unweighted, as Flower's FedMedian).

    The decision's weights are each client's share of the coordinates taken from it.
    """

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """The per-coordinate median update."""
        out = coordinate_median(updates.matrix)
        return out.delta, Decision(weights=out.weights, coordinatewise=True)
