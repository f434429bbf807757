"""Coordinate-wise median (Yin et al., ICML 2018), computed as Flower's FedMedian computes it."""

from __future__ import annotations

import numpy as np

from flip_fl.defenses.median import coordinate_median
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates


@DEFENSES.register("median")
class MedianDefense(Defense):
    """Coordinate-wise median of the client models (unweighted), as an update of the global model.

    The median is numpy's of the client models in the global model's float dtype, as Flower's FedMedian
    computes it, so the numbers are Flower's to the last bit (with an even number of clients the mean of the
    two middle values is rounded in that dtype). The decision's weights are each client's share of the
    coordinates taken from it (`flip_fl.defenses.median` on the float64 updates).
    """

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """The per-coordinate median of the client models, as an update of the global one."""
        models, global_params = self.client_models(updates)
        delta = np.median(models, axis=0).astype(np.float64) - global_params
        return delta, Decision(weights=coordinate_median(updates.matrix).weights, coordinatewise=True)
