"""Robust learning rate (Ozdayi et al., AAAI 2021): sign-disputed coordinates get the server step reversed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flip_fl.config import Config, ConfigError, key
from flip_fl.defenses.rlr import robust_lr
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates
from strategies.krum import assumed_malicious


@DEFENSES.register("rlr")
class RLRDefense(Defense):
    """RLR: coordinates where fewer than theta clients agree in sign get the server learning rate negated.

    Args:
        threshold: theta (capped at the round's replies).
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.rlr."""

        threshold: float | None = key(None, "Sign-agreement threshold theta; null: f + 1 with f = num_malicious.",
                                      ge=0.0)
        num_malicious: int | None = key(None, "f for the default threshold; null: the most attackers due in one "
                                              "round.", ge=0)

    def __init__(self, *, threshold: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    @classmethod
    def check(cls, params: Any, cfg: Config) -> None:
        """Theta no more than the sampled clients."""
        n = cfg.federation.clients_per_round
        if params.threshold is not None and params.threshold > n:
            raise ConfigError(f"defense.rlr.threshold: {params.threshold:g} exceeds federation.clients_per_round ({n})")

    @classmethod
    def options(cls, params: Any, cfg: Config) -> dict[str, Any]:
        """Theta, f + 1 by default."""
        theta = params.threshold if params.threshold is not None else assumed_malicious(params.num_malicious, cfg) + 1
        return {"threshold": theta}

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """The mean with sign-disputed coordinates reversed."""
        out = robust_lr(updates.matrix, min(float(self.threshold), len(updates)), 1.0, updates.weights)
        return out.delta, Decision.of(out)
