"""Bulyan (El Mhamdi et al., ICML 2018): Krum-based selection, then a trimmed mean around the median."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from flip_fl.config import key
from flip_fl.defenses.bulyan import Selection, bulyan
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, FloatArray, RoundUpdates
from strategies.krum import NUM_MALICIOUS_DOC, SelectionDefense


@DEFENSES.register("bulyan")
class BulyanDefense(SelectionDefense):
    """Bulyan (El Mhamdi et al. 2018).

    Krum-based selection of theta = n - 2f updates (the paper's iterated Krum, or Flower's one-shot
    Multi-Krum with `selection="one_shot"`), then per coordinate the mean of the beta = theta - 2f values
    closest to the median. `kept` is the client-level decision (the second stage is per coordinate); the
    selected clients' example weights average the BatchNorm statistics.

    Args:
        num_malicious: f.
        selection: "iterated" (the paper) or "one_shot" (Flower's `Bulyan`).
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.bulyan."""

        num_malicious: int | None = key(None, NUM_MALICIOUS_DOC + " Needs clients_per_round >= 4f + 3.", ge=0)
        selection: Literal["iterated", "one_shot"] = key(
            "iterated",
            "How theta = n - 2f updates are selected: iterated (the paper: Krum re-run on the remaining set after "
            "each pick) or one_shot (Flower's Bulyan: the theta best Krum scores of the full set).",
        )

    bound = "4f + 3"

    def __init__(self, *, num_malicious: int, selection: Selection = "iterated", **kwargs: Any) -> None:
        super().__init__(num_malicious=num_malicious, **kwargs)
        self.selection = selection

    @classmethod
    def minimum_for(cls, f: int) -> int:
        """Bulyan's n >= 4f + 3."""
        return 4 * f + 3

    def select(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """Bulyan's update; the decision's client-level choice is the Krum-based selection."""
        out = bulyan(updates.matrix, self.num_malicious, self.selection)
        weights = np.where(out.kept, updates.weights, 0.0)
        return out.delta, Decision(kept=out.kept, coordinatewise=True, statistics_weights=weights / weights.sum(),
                                   info={"selection": self.selection})
