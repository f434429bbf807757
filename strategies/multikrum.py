"""Multi-Krum (Blanchard et al., NeurIPS 2017): the mean of the m updates with the lowest Krum scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flip_fl.config import Config, ConfigError, key
from flip_fl.registry import DEFENSES
from strategies.krum import NUM_MALICIOUS_DOC, KrumDefense


@DEFENSES.register("multikrum")
class MultiKrumDefense(KrumDefense):
    """Multi-Krum: the (example-weighted) mean of the m lowest-scoring updates (m = n - f by default).

    Args:
        num_malicious: f.
        num_selected: m, the updates averaged; None: the round's replies minus f.
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.multikrum."""

        num_malicious: int | None = key(None, NUM_MALICIOUS_DOC + " Needs clients_per_round > 2f + 2.", ge=0)
        num_selected: int | None = key(None, "m, the updates averaged; null: the round's replies - f.", ge=1)

    def __init__(self, *, num_malicious: int, num_selected: int | None = None, **kwargs: Any) -> None:
        super().__init__(num_malicious=num_malicious, **kwargs)
        self.wanted = num_selected

    @classmethod
    def check(cls, params: Any, cfg: Config) -> None:
        """Krum's bound, and m no more than the sampled clients."""
        super().check(params, cfg)
        n = cfg.federation.clients_per_round
        if params.num_selected is not None and params.num_selected > n:
            raise ConfigError(f"defense.multikrum.num_selected: {params.num_selected} exceeds "
                              f"federation.clients_per_round ({n})")

    def num_selected(self, num_replies: int) -> int:
        """m, clipped to the replies of the round."""
        m = self.wanted if self.wanted is not None else num_replies - self.num_malicious
        return max(1, min(num_replies, m))
