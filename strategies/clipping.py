"""Defenses that bound each update's size and add noise: norm clipping, weak DP (Sun et al. 2019), FLAME.

The rules are numpy functions of the trained parameters' updates (`flip_fl.defenses.clipping`,
`flip_fl.defenses.flame`); see `strategies.defense.DeltaDefense` for how BatchNorm statistics and the
server learning rate are handled. Noise is specified as the std that reaches the global model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Message

from flip_fl.defenses.clipping import norm_clip, weak_dp
from flip_fl.defenses.flame import flame
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, DeltaDefense, noise_rng, outcome_decision


def clip_bound(clip_norm: float | None, updates: np.ndarray) -> float:
    """`clip_norm`, or the median update norm of the round when it is None."""
    if clip_norm is not None:
        return clip_norm
    norms = np.linalg.norm(updates, axis=1)
    return float(np.median(norms)) or float(norms.max()) or 1.0


@DEFENSES.register("norm_clip")
class NormClipDefense(DeltaDefense):
    """Norm clipping (Sun et al. 2019): every update scaled into an L2 ball.

    Args:
        clip_norm: the ball's radius; None: the median update norm of each round.
        **kwargs: those of `SeededFedAvg`.
    """

    name = "norm_clip"

    def __init__(self, *, clip_norm: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clip_norm = clip_norm

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        """The (example-weighted) mean of the clipped updates."""
        out = norm_clip(updates, clip_bound(self.clip_norm, updates), self.example_weights(replies))
        return out.delta, outcome_decision(out, scales=True)


@DEFENSES.register("weak_dp")
class WeakDPDefense(DeltaDefense):
    """Weak DP (Sun et al. 2019): norm clipping, then Gaussian noise on the model.

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

    name = "weak_dp"

    def __init__(self, *, clip_norm: float | None = None, noise_std: float = 0.001, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clip_norm, self.noise_std, self.seed = clip_norm, noise_std, seed

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        """Clipped mean plus seeded noise (divided by the server lr, so `noise_std` reaches the model)."""
        out = weak_dp(updates, clip_bound(self.clip_norm, updates), self.noise_std / self.server_lr,
                      noise_rng(self.seed, server_round), self.example_weights(replies))
        out.info["noise_std"] = self.noise_std
        return out.delta, outcome_decision(out, scales=True)


@DEFENSES.register("flame")
class FLAMEDefense(DeltaDefense):
    """FLAME (Nguyen et al. 2022): clustering, clipping and noise.

    HDBSCAN on cosine distances of the parameter updates, clipping to their median norm, Gaussian
    noise of std flame_lambda * median norm on the model.

    Args:
        flame_lambda: the noise level lambda.
        seed: the run's seed (the noise of a round is seeded by it and the round).
        **kwargs: those of `SeededFedAvg`.
    """

    name = "flame"

    def __init__(self, *, flame_lambda: float = 0.001, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.flame_lambda, self.seed = flame_lambda, seed
        import sklearn.cluster  # noqa: F401  (heavy: imported now, so its import time is not counted as round 1's cost)

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        """FLAME's aggregate of the parameter updates; the decision keeps the largest cluster."""
        lam = self.flame_lambda
        out = flame(updates, clustering_mask=None, noise_lambda=lam / self.server_lr,
                    rng=noise_rng(self.seed, server_round))
        out.info["noise_std"] = lam * out.info["clip_norm"]
        return out.delta, outcome_decision(out, kept=True, scales=True)
