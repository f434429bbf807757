"""Coordinate-wise trimmed mean (Yin et al., ICML 2018), computed as Flower's FedTrimmedAvg computes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from flip_fl.config import key
from flip_fl.defenses.trimmed_mean import trimmed_mean
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates


@DEFENSES.register("trimmed_mean")
class TrimmedMeanDefense(Defense):
    """Per coordinate, the mean of the values left when the beta*n smallest and largest are cut.

    The aggregate is Flower's `trim_mean` (FedTrimmedAvg) of the client models in the global model's float
    dtype, so the numbers are Flower's to the last bit (a trimmed mean of models equals global + the trimmed
    mean of updates, up to the rounding of that dtype). The decision's weights are each client's share of the
    surviving coordinates (`flip_fl.defenses.trimmed_mean` on the float64 updates).

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
        """The per-coordinate trimmed mean of the client models, as an update of the global one."""
        models, global_params = self.client_models(updates)
        delta = np.asarray(trim_mean(models, self.beta), dtype=np.float64) - global_params
        shares = trimmed_mean(updates.matrix, self.beta)
        return delta, Decision(weights=shares.weights, coordinatewise=True,
                               info={"num_trimmed_per_side": shares.info["num_trimmed_per_side"]})
