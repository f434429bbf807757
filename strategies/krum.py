"""Krum (Blanchard et al., NeurIPS 2017): the single update closest to its n - f - 2 neighbours.

Also the base of the rules that select clients under an assumed number f of attackers (Multi-Krum,
Bulyan). The selection itself is `flip_fl.defenses.krum.krum`, on float64 updates with exact pairwise
distances. Each rule has a bound on the replies it needs for f (Krum: n > 2f + 2); the config guarantees it
for the sampled clients, and a round whose valid replies fall below it (client failures) keeps the global
model and is recorded as skipped, never as a decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flip_fl.config import Config, ConfigError, key, max_attackers_per_round
from flip_fl.defenses.krum import krum
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates

NUM_MALICIOUS_DOC = "f, the attackers the rule assumes per round; null: the most attackers due in one round."


def assumed_malicious(num_malicious: int | None, cfg: Config) -> int:
    """`num_malicious`, or the most attackers due in one round of the run."""
    return num_malicious if num_malicious is not None else max_attackers_per_round(cfg)


class SelectionDefense(Defense):
    """A rule that needs at least `minimum_replies()` replies for f = `num_malicious`; rounds with fewer are skipped.

    Subclasses implement `select` (the rule when the bound holds) and `minimum_replies`; `bound` names it.

    Args:
        num_malicious: f, the number of malicious clients the rule assumes.
        **kwargs: those of `SeededFedAvg`.
    """

    bound: str = ""

    def __init__(self, *, num_malicious: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_malicious = num_malicious

    @classmethod
    def options(cls, params: Any, cfg: Config) -> dict[str, Any]:
        """The params, with f resolved from the attack schedule when null."""
        return {**super().options(params, cfg), "num_malicious": assumed_malicious(params.num_malicious, cfg)}

    @classmethod
    def check(cls, params: Any, cfg: Config) -> None:
        """F must leave the rule enough of the sampled clients."""
        f, n = assumed_malicious(params.num_malicious, cfg), cfg.federation.clients_per_round
        if f >= n:
            raise ConfigError(f"defense.{cls.name}.num_malicious: f = {f} must be below federation.clients_per_round "
                              f"({n})")
        needed = cls.minimum_for(f)
        if n < needed:
            raise ConfigError(f"defense.{cls.name}.num_malicious: {cls.name} needs federation.clients_per_round >= "
                              f"{cls.bound} = {needed} for f = {f}; set a lower defense.{cls.name}.num_malicious or "
                              "sample more clients")

    @classmethod
    def minimum_for(cls, f: int) -> int:
        """The fewest replies the rule's guarantee holds for, with f attackers."""
        raise NotImplementedError

    def minimum_replies(self) -> int:
        """The fewest replies the rule's guarantee holds for."""
        return self.minimum_for(self.num_malicious)

    def select(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """The rule, on a round with enough replies."""
        raise NotImplementedError

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """`select`, or no decision (the global model is kept) when too few clients replied."""
        info: dict[str, Any] = {"num_malicious": self.num_malicious}
        if len(updates) < self.minimum_replies():
            reason = (f"{len(updates)} valid replies; {self.name} with f = {self.num_malicious} needs "
                      f"{self.bound} = {self.minimum_replies()}")
            return np.zeros(updates.matrix.shape[1]), Decision(skipped=reason, info=info)
        delta, decision = self.select(updates)
        decision.info = {**info, **decision.info, "skipped": False}
        return delta, decision


@DEFENSES.register("krum")
class KrumDefense(SelectionDefense):
    """Krum (Blanchard et al. 2017): the single update closest to its n - f - 2 neighbours.

    Args:
        num_malicious: f, the number of malicious clients the rule assumes.
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.krum."""

        num_malicious: int | None = key(None, NUM_MALICIOUS_DOC + " Needs clients_per_round > 2f + 2.", ge=0)

    bound = "2f + 3"

    @classmethod
    def minimum_for(cls, f: int) -> int:
        """Krum's n > 2f + 2."""
        return 2 * f + 3

    def num_selected(self, num_replies: int) -> int:
        """How many updates the rule averages (one for Krum)."""
        return 1

    def select(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """The selected updates' (example-weighted) mean; the decision names them."""
        out = krum(updates.matrix, self.num_malicious, multi_k=self.num_selected(len(updates)),
                   weights=updates.weights)
        return out.delta, Decision(weights=out.weights, kept=out.kept)
