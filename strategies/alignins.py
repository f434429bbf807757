"""AlignIns (Xu, Zhang & Hu, CVPR 2025): direction alignment inspection, MZ-score filtering, post-filtering clipping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flip_fl.config import key
from flip_fl.defenses.alignins import alignins
from flip_fl.defenses.updates import bn_statistic_mask, flatten_state
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates


@DEFENSES.register("alignins")
class AlignInsDefense(Defense):
    """AlignIns: keep updates whose TDA and MPSA MZ-scores are below lambda_c and lambda_s, clip, average.

    TDA is each update's cosine with the global model's trained parameters, MPSA its agreement with the
    principal sign on its top `sparsity` fraction of coordinates; the kept updates are clipped to their
    median norm and averaged with `server.weighted` weights. Defaults: the authors' (`src/federated.py`).

    Args:
        sparsity: fraction of coordinates (largest |u|) MPSA inspects.
        lambda_s: MZ-score bound of MPSA.
        lambda_c: MZ-score bound of TDA.
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.alignins."""

        sparsity: float = key(0.3, "Fraction of each update's coordinates (largest magnitudes) that MPSA inspects "
                                   "(top-k).", gt=0.0, le=1.0)
        lambda_s: float = key(1.0, "MZ-score bound of MPSA (sign alignment): a larger MZ-score is rejected.", gt=0.0)
        lambda_c: float = key(1.0, "MZ-score bound of TDA (cosine with the global model): a larger MZ-score is "
                                   "rejected.", gt=0.0)

    def __init__(self, *, sparsity: float = 0.3, lambda_s: float = 1.0, lambda_c: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sparsity, self.lambda_s, self.lambda_c = sparsity, lambda_s, lambda_c

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """AlignIns' aggregate of the parameter updates; the decision keeps the clients passing both filters."""
        theta = flatten_state([self.global_state])[0][~bn_statistic_mask(self.global_state)]
        out = alignins(updates.matrix, theta, self.sparsity, self.lambda_s, self.lambda_c, updates.weights)
        return out.delta, Decision.of(out, kept=True, scales=True)
