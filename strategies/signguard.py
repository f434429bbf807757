"""SignGuard (Xu et al., ICDCS 2022): norm filtering, sign-statistics clustering, clipping to the median norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flip_fl.config import Config, key
from flip_fl.defenses.signguard import signguard
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates, noise_rng


@DEFENSES.register("signguard")
class SignGuardDefense(Defense):
    """SignGuard: the mean, clipped to the median norm, of the updates that pass the norm and sign filters.

    An update is kept when its norm is within (lower, upper) x the median norm and its sign statistics (on
    random coordinates) fall in the largest MeanShift cluster.

    The coordinates are drawn from the run's seed and the round. A round where no client passes both filters
    keeps the global model and is recorded as skipped.

    Args:
        lower_bound: L of the norm filter.
        upper_bound: R of the norm filter.
        coordinate_fraction: the share of coordinates whose signs are counted.
        seed: the run's seed.
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.signguard."""

        lower_bound: float = key(0.1, "L: updates with norm <= L x the median norm are rejected.", ge=0.0, lt=1.0)
        upper_bound: float = key(3.0, "R: updates with norm >= R x the median norm are rejected.", gt=1.0)
        coordinate_fraction: float = key(0.1, "Share of the coordinates, drawn at random each round, whose signs "
                                              "give the clustering features.", gt=0.0, le=1.0)

    def __init__(self, *, lower_bound: float = 0.1, upper_bound: float = 3.0, coordinate_fraction: float = 0.1,
                 seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lower_bound, self.upper_bound = lower_bound, upper_bound
        self.coordinate_fraction, self.seed = coordinate_fraction, seed
        import sklearn.cluster  # noqa: F401  (heavy: imported now, so its import time is not counted as round 1's cost)

    @classmethod
    def options(cls, params: Any, cfg: Config) -> dict[str, Any]:
        """The params and the run's seed."""
        return {**super().options(params, cfg), "seed": cfg.seed}

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """The mean of the kept updates clipped to the median norm; no decision when no client is kept."""
        out = signguard(updates.matrix, self.lower_bound, self.upper_bound, self.coordinate_fraction,
                        noise_rng(self.seed, updates.server_round))
        info = {k: v for k, v in out.info.items() if k != "empty"}
        if out.info["empty"]:
            reason = "no client passed both the norm filter and the sign clustering"
            return np.zeros(updates.matrix.shape[1]), Decision(skipped=reason, info=info)
        return out.delta, Decision(weights=out.weights, kept=out.kept, scales=out.arrays["scale"], info=info)
