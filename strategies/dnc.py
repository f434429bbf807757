"""Divide-and-Conquer, DnC (Shejwalkar & Houmansadr, NDSS 2021): spectral outlier scores on random coordinates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flip_fl.config import Config, ConfigError, key
from flip_fl.defenses.dnc import dnc, removed_count
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates, noise_rng
from strategies.krum import NUM_MALICIOUS_DOC, assumed_malicious


@DEFENSES.register("dnc")
class DnCDefense(Defense):
    """DnC: the mean of the updates that no iteration's spectral outlier filter removes.

    Each of `iterations` times, the ceil(c f) updates with the largest squared projections on the top singular
    vector of `sub_dim` random coordinates (centred) are removed.

    The coordinates are drawn from the run's seed and the round. A round whose valid replies are no more than
    ceil(c f), or whose kept sets do not intersect, keeps the global model and is recorded as skipped.

    Args:
        num_malicious: f, the attackers the rule assumes per round.
        filter_frac: c, the filtering fraction (ceil(c f) removed per iteration).
        sub_dim: b, the coordinates sampled per iteration (all when the update has fewer).
        iterations: niters.
        seed: the run's seed.
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.dnc."""

        num_malicious: int | None = key(None, NUM_MALICIOUS_DOC, ge=0)
        filter_frac: float = key(1.0, "c, the filtering fraction: each iteration removes ceil(c * f) clients.", gt=0.0)
        sub_dim: int = key(10000, "b, coordinates sampled per iteration (all of them when the update has fewer).", ge=1)
        iterations: int = key(5, "niters, the sub-sampling iterations whose kept sets are intersected.", ge=1)

    def __init__(self, *, num_malicious: int, filter_frac: float = 1.0, sub_dim: int = 10000, iterations: int = 5,
                 seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_malicious, self.filter_frac = num_malicious, filter_frac
        self.sub_dim, self.iterations, self.seed = sub_dim, iterations, seed
        self.num_remove = removed_count(filter_frac, num_malicious)

    @classmethod
    def options(cls, params: Any, cfg: Config) -> dict[str, Any]:
        """The params, f resolved from the attack schedule when null, and the run's seed."""
        return {**super().options(params, cfg), "num_malicious": assumed_malicious(params.num_malicious, cfg),
                "seed": cfg.seed}

    @classmethod
    def check(cls, params: Any, cfg: Config) -> None:
        """F below the sampled clients, and ceil(c f) leaving at least one of them."""
        f, n = assumed_malicious(params.num_malicious, cfg), cfg.federation.clients_per_round
        if f >= n:
            raise ConfigError(f"defense.dnc.num_malicious: f = {f} must be below federation.clients_per_round ({n})")
        removed = removed_count(params.filter_frac, f)
        if removed >= n:
            raise ConfigError(f"defense.dnc.filter_frac: c = {params.filter_frac:g} removes ceil(c * f) = {removed} "
                              f"clients for f = {f}, every one of federation.clients_per_round ({n}); set c <= "
                              f"{(n - 1) / f:g}")

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """The mean of the updates no iteration removed; no decision when too few replied or nothing is left."""
        info: dict[str, Any] = {"num_malicious": self.num_malicious, "num_removed": self.num_remove}
        d = updates.matrix.shape[1]
        if len(updates) <= self.num_remove:
            reason = (f"{len(updates)} valid replies; dnc removes ceil(c f) = {self.num_remove} (c = "
                      f"{self.filter_frac:g}, f = {self.num_malicious}) and needs more")
            return np.zeros(d), Decision(skipped=reason, info=info)
        out = dnc(updates.matrix, self.num_remove, self.sub_dim, self.iterations,
                  noise_rng(self.seed, updates.server_round))
        info.update(out.info)
        del info["empty"]
        if out.info["empty"]:
            reason = f"the kept sets of the {self.iterations} iterations do not intersect"
            return np.zeros(d), Decision(skipped=reason, info=info)
        return out.delta, Decision(weights=out.weights, kept=out.kept, info={**info, "skipped": False})
