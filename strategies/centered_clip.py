"""Centered clipping (Karimireddy, He & Jaggi, ICML 2021): iterative clipping around the previous aggregate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from flip_fl.config import key
from flip_fl.defenses.centered_clip import centered_clip
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates

PREVIOUS = "previous_update"
"""The `state_dict` entry holding the last aggregate update."""


@DEFENSES.register("centered_clip")
class CenteredClipDefense(Defense):
    """Centered clipping: `iterations` steps v += mean_i clip_tau(u_i - v) from the last aggregate update.

    The result is the round's aggregate update and the next round's starting point.

    Every client stays in the aggregate (no client is rejected): `defense_weights` are the coefficients of
    the clients' updates in it (clipping included), `defense_history_weight` that of the previous aggregate.
    The previous aggregate (float64, trained parameters) is checkpointed, so a resumed run continues it.

    Args:
        tau: the clipping radius, in update-norm units.
        iterations: L, the clipping iterations per round.
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.centered_clip."""

        tau: float = key(100.0, "Clipping radius tau of each update's distance from the running aggregate, in update-"
                                "norm units (the authors' code: 100, for gradient momenta).", gt=0.0)
        iterations: int = key(1, "L, clipping iterations per round (the authors' code: 1).", ge=1)

    def __init__(self, *, tau: float = 100.0, iterations: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tau, self.iterations = tau, iterations
        self.previous: np.ndarray | None = None

    def state_dict(self) -> dict[str, np.ndarray]:
        """The last aggregate update (none before the first round)."""
        return {} if self.previous is None else {PREVIOUS: self.previous.copy()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the last aggregate update of a `state_dict`."""
        bad = [k for k in state if k != PREVIOUS]
        if bad:
            raise ValueError(f"centered clipping state has unexpected entries {bad[:3]}")
        self.previous = np.asarray(state[PREVIOUS], dtype=np.float64).copy() if PREVIOUS in state else None

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """Centered clipping around the previous aggregate; the result becomes the next round's start."""
        d = updates.matrix.shape[1]
        if self.previous is not None and self.previous.shape != (d,):
            raise ValueError(f"centered clipping: the stored previous aggregate has {self.previous.size} entries, the "
                             f"round's updates {d} (a checkpoint of another model?)")
        out = centered_clip(updates.matrix, self.previous, self.tau, self.iterations)
        self.previous = out.delta.copy()
        return out.delta, Decision(weights=out.weights, statistics_weights=out.weights / out.weights.sum(),
                                   info=dict(out.info))
