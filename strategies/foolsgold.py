"""FoolsGold (Fung et al., RAID 2020): clients whose accumulated updates look alike are down-weighted."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from flip_fl.config import key
from flip_fl.defenses.foolsgold import foolsgold
from flip_fl.defenses.updates import BN_STATISTIC_SUFFIXES
from flip_fl.registry import DEFENSES
from strategies.defense import BoolArray, Decision, Defense, FloatArray, RoundUpdates


@DEFENSES.register("foolsgold")
class FoolsGoldDefense(Defense):
    """FoolsGold: weights from the cosine similarity of the clients' accumulated updates.

    The history of every partition id lives in the strategy (float32), grows whenever that partition is
    sampled, and is checkpointed (`state_dict`), so a resumed run continues it.

    Args:
        features: the compared coordinates: all trained parameters, or those of the output layer.
        confidence: kappa of the logit re-weighting.
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.foolsgold."""

        features: Literal["all", "output_layer"] = key(
            "all", "Coordinates of the history similarity (all trained parameters, or the output layer).")
        confidence: float = key(1.0, "Confidence kappa of the logit re-weighting.", gt=0.0)

    def __init__(self, *, features: Literal["all", "output_layer"] = "all", confidence: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.features, self.confidence = features, confidence
        self.history: dict[int, np.ndarray] = {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The client histories, as `history/<partition id>` (checkpointed: a resumed run continues them)."""
        return {f"history/{pid}": row.copy() for pid, row in sorted(self.history.items())}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the client histories of a `state_dict`."""
        bad = [k for k in state if not k.startswith("history/")]
        if bad:
            raise ValueError(f"FoolsGold state has unexpected entries {bad[:3]}")
        self.history = {int(k.split("/", 1)[1]): np.asarray(v, dtype=np.float32) for k, v in state.items()}

    def feature_mask(self) -> BoolArray | None:
        """Compared parameter coordinates: all (None), or those of the output layer."""
        if self.features == "all":
            return None
        params = [k for k in self.global_state if k.rsplit(".", 1)[-1] not in BN_STATISTIC_SUFFIXES]
        layer = params[-1].rsplit(".", 1)[0] + "."
        return np.concatenate([np.full(self.global_state[k].size, k.startswith(layer)) for k in params])

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """FoolsGold's weighted mean; the clients' histories are updated."""
        mask = self.feature_mask()
        width = updates.matrix.shape[1] if mask is None else int(mask.sum())
        history = np.stack([self.history.get(pid, np.zeros(width, dtype=np.float32)) for pid in updates.clients])
        out = foolsgold(updates.matrix, history, confidence=self.confidence, similarity_mask=mask)
        for pid, row in zip(updates.clients, out.arrays["history"]):
            self.history[pid] = row.astype(np.float32)
        return out.delta, Decision.of(out, kept=True)
