"""FreqFed (Fereidooni et al., NDSS 2024): low-frequency DCT components of the updates, HDBSCAN, majority cluster."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flip_fl.defenses.freqfed import freqfed
from flip_fl.defenses.updates import BN_STATISTIC_SUFFIXES
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates


def trained_shapes(state: Mapping[str, Any]) -> list[tuple[int, ...]]:
    """The shapes of the state's trained tensors (BatchNorm statistics left out), in its key order.

    They lay out the columns of `RoundUpdates.matrix`.
    """
    return [tuple(np.shape(v)) for k, v in state.items() if k.rsplit(".", 1)[-1] not in BN_STATISTIC_SUFFIXES]


@DEFENSES.register("freqfed")
class FreqFedDefense(Defense):
    """FreqFed: HDBSCAN on cosine distances of the updates' low-frequency DCT coefficients, FedAvg of the cluster.

    Each trained tensor of an update (first dimension by the rest) goes through the orthonormal 2-D DCT-II;
    the coefficients with i + j <= floor(P / 2) form the client's vector. The decision keeps the largest
    cluster (a majority: min_cluster_size = n // 2 + 1) and averages it with `server.weighted` weights.
    The rule has no parameters.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import scipy.fft  # noqa: F401  (heavy: imported now, so its import time is not counted as round 1's cost)
        import sklearn.cluster  # noqa: F401

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """FreqFed's aggregate of the parameter updates; the decision keeps the largest cluster."""
        out = freqfed(updates.matrix, trained_shapes(self.global_state), updates.weights)
        return out.delta, Decision.of(out, kept=True)
