"""FLDetector (Zhang et al., KDD 2022): clients whose updates disagree with their L-BFGS prediction are excluded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from flip_fl.config import Config, key
from flip_fl.defenses.fldetector import STATE_KEYS, FLDetectorState, fldetector_round
from flip_fl.defenses.updates import BN_STATISTIC_SUFFIXES
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates, noise_rng


@DEFENSES.register("fldetector")
class FLDetectorDefense(Defense):
    """FLDetector: predict each update from the client's last one and the global history, flag inconsistent clients.

    A client flagged by the gap statistic and k-means on the suspicious scores is excluded from that round on:
    its updates are never aggregated again (`defense_rejected` every round it is sampled). Detection needs
    the Hessian window to be full (N + 1 rounds of history, from round N + 2) and stops once it has flagged
    clients; until it runs every client is kept and the rule is the aggregation alone. The histories
    (window-bounded) and the excluded clients are checkpointed (`state_dict`).

    Args:
        window: N, the rounds of global history behind the L-BFGS Hessian and of distances behind a score.
        aggregation: the rule on the kept clients: coordinate-wise median or the (example-weighted) mean.
        seed: the run's seed (the gap statistic's reference draws, per round).
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.fldetector."""

        window: int = key(10, "Window N: rounds of global history for the L-BFGS Hessian, and of distances "
                              "averaged into a client's suspicious score.", ge=1)
        aggregation: Literal["median", "mean"] = key(
            "median", "Aggregation of the clients not excluded: coordinate-wise median, or the mean (weighted "
                      "by num-examples under server.weighted).")

    def __init__(self, *, window: int = 10, aggregation: Literal["median", "mean"] = "median", seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.window, self.aggregation, self.seed = window, aggregation, seed
        self.history = FLDetectorState(window)

    @classmethod
    def options(cls, params: Any, cfg: Config) -> dict[str, Any]:
        """The params and the run's seed."""
        return {**super().options(params, cfg), "seed": cfg.seed}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The histories and the excluded clients (`FLDetectorState.state_dict`), as `fldetector/<name>`."""
        return {f"fldetector/{k}": v for k, v in self.history.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a `state_dict`."""
        expected = {f"fldetector/{k}" for k in STATE_KEYS}
        bad = sorted(set(state) - expected)
        if bad:
            raise ValueError(f"FLDetector state has unexpected entries {bad[:3]}")
        if not state:
            self.history = FLDetectorState(self.window)
            return
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(f"FLDetector state lacks {missing[:3]}")
        self.history = FLDetectorState.from_state_dict(self.window, {k.removeprefix("fldetector/"): v
                                                                     for k, v in state.items()})

    def global_parameters(self) -> FloatArray:
        """The global model's trained parameters, flat, in the update matrix's order."""
        return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for k, v in self.global_state.items()
                               if k.rsplit(".", 1)[-1] not in BN_STATISTIC_SUFFIXES])

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """FLDetector's round: scores, detection, exclusion, then the aggregation of the others."""
        out = fldetector_round(self.history, updates.server_round, self.global_parameters(), updates.matrix,
                               updates.clients, noise_rng(self.seed, updates.server_round), self.aggregation,
                               updates.weights)
        return out.delta, Decision(weights=out.weights, kept=out.kept, coordinatewise=self.aggregation == "median",
                                   info=dict(out.info))
