"""RFA (Pillutla et al., IEEE TSP 2022): the geometric median of the updates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flip_fl.config import key
from flip_fl.defenses.rfa import geometric_median
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates


@DEFENSES.register("rfa")
class RFADefense(Defense):
    """RFA: the (example-weighted) geometric median by smoothed Weiszfeld.

    Args:
        iters: maximum Weiszfeld iterations.
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.rfa."""

        iters: int = key(100, "Maximum smoothed-Weiszfeld iterations (stops early at a relative change of 1e-6; the "
                              "RFA code uses 4).", ge=1)

    def __init__(self, *, iters: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iters = iters

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """The geometric median of the updates; the decision holds the Weiszfeld weights."""
        out = geometric_median(updates.matrix, updates.weights, iters=self.iters)
        return out.delta, Decision.of(out)
