"""Defenses that bound each update's size and add noise: norm clipping, weak DP (Sun et al. 2019), FLAME.

Each rule sees the update matrix of the trained parameters (delta_i = local_i - global, one row per
sorted reply) and returns an aggregate update and per-client weights. BatchNorm statistics (running
mean/var, batch counters) are not updates of trained weights -- the counters alone would dominate
norms and cosines -- so they never enter a rule: their aggregate is the weighted mean of the clients'
statistics with the rule's weights (a rejected client contributes nothing). The strategy hands back
global + delta, so SeededFedAvg applies the same server learning rate as everywhere else:
global += server.lr * delta. Noise is specified as the std that reaches the global model (the rules
add it to the delta, hence the division by server.lr) and only touches trained parameters.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message

from flip_fl.config import Config
from flip_fl.defenses.clipping import norm_clip, weak_dp
from flip_fl.defenses.flame import flame
from strategies.defense import Decision, DeltaDefense, outcome_decision


def clip_bound(cfg: Config, updates: np.ndarray) -> float:
    """defense.clip_norm, or the median update norm of the round when it is null."""
    if cfg.defense.clip_norm is not None:
        return cfg.defense.clip_norm
    norms = np.linalg.norm(updates, axis=1)
    return float(np.median(norms)) or float(norms.max()) or 1.0


class NormClipDefense(DeltaDefense):
    """Norm clipping (Sun et al. 2019): every update scaled into an L2 ball of radius defense.clip_norm."""

    name = "norm_clip"

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        out = norm_clip(updates, clip_bound(self.cfg, updates), self.example_weights(replies))
        return out.delta, outcome_decision(out, scales=True)


class WeakDPDefense(DeltaDefense):
    """Weak DP (Sun et al. 2019): norm clipping, then Gaussian noise of std defense.noise_std on the model.

    Not Flower's DifferentialPrivacyServerSideFixedClipping: that wrapper draws from numpy's global,
    unseeded generator (runs would not repeat), adds noise to every entry including BatchNorm
    statistics and integer counters, sizes it as noise_multiplier * clip / n, and wraps the strategy
    from outside, so our per-round records and server learning rate would not see it.
    """

    name = "weak_dp"

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        d = self.cfg.defense
        out = weak_dp(updates, clip_bound(self.cfg, updates), d.noise_std / self.cfg.server.lr,
                             self.rng(server_round), self.example_weights(replies))
        out.info["noise_std"] = d.noise_std
        return out.delta, outcome_decision(out, scales=True)


class FLAMEDefense(DeltaDefense):
    """FLAME (Nguyen et al. 2022): clustering, clipping and noise.

    HDBSCAN on cosine distances of the parameter updates, clipping to their median norm, Gaussian
    noise of std defense.flame_lambda * median norm on the model.
    """

    name = "flame"

    def __init__(self, cfg: Config, node_partitions: dict[int, int], base_config: dict[str, str]) -> None:
        super().__init__(cfg, node_partitions, base_config)
        import sklearn.cluster  # noqa: F401  (imported now, so its import time is not counted as round 1's cost)

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        lam = self.cfg.defense.flame_lambda
        out = flame(updates, clustering_mask=None, noise_lambda=lam / self.cfg.server.lr,
                           rng=self.rng(server_round))
        out.info["noise_std"] = lam * out.info["clip_norm"]
        return out.delta, outcome_decision(out, kept=True, scales=True)
