"""Weak differential privacy (Sun et al., 2019): norm clipping, then Gaussian noise on the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flip_fl.config import Config, key
from flip_fl.defenses.clipping import weak_dp
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates, noise_rng
from strategies.norm_clip import CLIP_NORM_DOC, clip_bound


@DEFENSES.register("weak_dp")
class WeakDPDefense(Defense):
    """Weak DP: norm clipping, then seeded Gaussian noise on the trained parameters.

    Not Flower's DifferentialPrivacyServerSideFixedClipping: that wrapper draws from numpy's global,
    unseeded generator (runs would not repeat), adds noise to every entry including BatchNorm
    statistics and integer counters, sizes it as noise_multiplier * clip / n, and wraps the strategy
    from outside, so our per-round records and server learning rate would not see it.

    Args:
        clip_norm: the clipping radius; None: the median update norm of each round.
        noise_std: std of the noise that reaches the global model, per trained parameter.
        seed: the run's seed (the noise of a round is seeded by it and the round).
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.weak_dp."""

        clip_norm: float | None = key(None, CLIP_NORM_DOC, gt=0.0)
        noise_std: float = key(0.001, "Std of the Gaussian noise that reaches the global model, per coordinate "
                                      "(BatchNorm statistics excluded).", ge=0.0)

    def __init__(self, *, clip_norm: float | None = None, noise_std: float = 0.001, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clip_norm, self.noise_std, self.seed = clip_norm, noise_std, seed

    @classmethod
    def options(cls, params: Any, cfg: Config) -> dict[str, Any]:
        """The params and the run's seed."""
        return {**super().options(params, cfg), "seed": cfg.seed}

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """Clipped mean plus seeded noise (divided by the server lr, so `noise_std` reaches the model)."""
        out = weak_dp(updates.matrix, clip_bound(self.clip_norm, updates.matrix), self.noise_std / self.server_lr,
                      noise_rng(self.seed, updates.server_round), updates.weights)
        out.info["noise_std"] = self.noise_std
        return out.delta, Decision.of(out, scales=True)
