"""Norm clipping (Sun et al., 2019, "Can you really backdoor federated learning?")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flip_fl.config import key
from flip_fl.defenses.clipping import norm_clip
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates

CLIP_NORM_DOC = "L2 bound on each update; null: the median update norm of the round."


def clip_bound(clip_norm: float | None, updates: FloatArray) -> float:
    """`clip_norm`, or the median update norm of the round when it is None."""
    if clip_norm is not None:
        return clip_norm
    norms = np.linalg.norm(updates, axis=1)
    return float(np.median(norms)) or float(norms.max()) or 1.0


@DEFENSES.register("norm_clip")
class NormClipDefense(Defense):
    """Norm clipping: every update scaled into an L2 ball, then the (example-weighted) mean.

    Args:
        clip_norm: the ball's radius; None: the median update norm of each round.
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.norm_clip."""

        clip_norm: float | None = key(None, CLIP_NORM_DOC, gt=0.0)

    def __init__(self, *, clip_norm: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clip_norm = clip_norm

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """The (example-weighted) mean of the clipped updates."""
        out = norm_clip(updates.matrix, clip_bound(self.clip_norm, updates.matrix), updates.weights)
        return out.delta, Decision.of(out, scales=True)
