"""FLAME (Nguyen et al., USENIX Security 2022): clustering, clipping and noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flip_fl.config import Config, key
from flip_fl.defenses.flame import flame
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates, noise_rng


@DEFENSES.register("flame")
class FLAMEDefense(Defense):
    """FLAME: HDBSCAN on cosine distances of the updates, clipping to their median norm, Gaussian noise.

    The noise on the model has std noise_lambda * median norm; the decision keeps the largest cluster.

    Args:
        noise_lambda: the noise level lambda.
        seed: the run's seed (the noise of a round is seeded by it and the round).
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.flame."""

        noise_lambda: float = key(0.001, "Noise level lambda: the model gets Gaussian noise of std lambda * median "
                                         "update norm.", ge=0.0)

    def __init__(self, *, noise_lambda: float = 0.001, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.noise_lambda, self.seed = noise_lambda, seed
        import sklearn.cluster  # noqa: F401  (heavy: imported now, so its import time is not counted as round 1's cost)

    @classmethod
    def options(cls, params: Any, cfg: Config) -> dict[str, Any]:
        """The params and the run's seed."""
        return {**super().options(params, cfg), "seed": cfg.seed}

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """FLAME's aggregate of the parameter updates; the decision keeps the largest cluster."""
        lam = self.noise_lambda
        out = flame(updates.matrix, clustering_mask=None, noise_lambda=lam / self.server_lr,
                    rng=noise_rng(self.seed, updates.server_round))
        out.info["noise_std"] = lam * out.info["clip_norm"]
        return out.delta, Decision.of(out, kept=True, scales=True)
