"""Defenses that select clients: Krum, Multi-Krum and Bulyan.

The rules are the numpy functions `flip_fl.defenses.krum.krum` (with Flower's neighbour count,
`max(1, n - f - 2)`, and no bound on f) and `flip_fl.defenses.bulyan.bulyan` (Flower's one-shot
selection); they return which clients they selected. They see the trained parameters' updates only:
BatchNorm statistics (running mean/var and the batch counters, which differ by the number of local steps
and would dominate the distances) are averaged over the selected clients afterwards, with the selection's
(example) weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from flip_fl.defenses.bulyan import bulyan
from flip_fl.defenses.krum import krum
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, DeltaDefense
from strategies.seeded_fedavg import numpy_to_arrays


@DEFENSES.register("krum")
class KrumDefense(DeltaDefense):
    """Krum (Blanchard et al. 2017): the single update closest to its n - f - 2 neighbours.

    Args:
        num_malicious: f, the number of malicious clients the rule assumes.
        **kwargs: those of `SeededFedAvg`.
    """

    name = "krum"

    def __init__(self, *, num_malicious: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_malicious = num_malicious

    def num_selected(self, num_replies: int) -> int:
        """How many updates the rule averages (one for Krum)."""
        return 1

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        """The selected updates' (example-weighted) mean; the decision names them."""
        out = krum(updates, self.num_malicious, multi_k=self.num_selected(len(replies)),
                   weights=self.example_weights(replies), strict=False)
        return out.delta, Decision(weights=out.weights, kept=out.kept, info={"num_malicious": self.num_malicious})


@DEFENSES.register("multikrum")
class MultiKrumDefense(KrumDefense):
    """Multi-Krum: the (example-weighted) mean of the m lowest-scoring updates (m = n - f by default).

    Args:
        num_malicious: f.
        num_selected: m, the updates averaged; None: the round's replies minus f.
        **kwargs: those of `SeededFedAvg`.
    """

    name = "multikrum"

    def __init__(self, *, num_malicious: int, num_selected: int | None = None, **kwargs: Any) -> None:
        super().__init__(num_malicious=num_malicious, **kwargs)
        self.wanted = num_selected

    def num_selected(self, num_replies: int) -> int:
        """m, clipped to the replies of the round."""
        m = self.wanted if self.wanted is not None else num_replies - self.num_malicious
        return max(1, min(num_replies, m))


@DEFENSES.register("bulyan")
class BulyanDefense(DeltaDefense):
    """Bulyan (El Mhamdi et al. 2018) as Flower implements it.

    One-shot Multi-Krum selection of theta = n - 2f updates, then per coordinate the mean of the
    beta = theta - 2f values closest to the median. A round with fewer than 4f + 3 replies (client
    failures) keeps the global model.

    Args:
        num_malicious: f.
        **kwargs: those of `SeededFedAvg`.
    """

    name = "bulyan"

    def __init__(self, *, num_malicious: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_malicious = num_malicious

    def aggregate_rule(self, server_round: int,
                       replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None, Decision | None]:
        """Bulyan on the updates, or the global model when too few clients replied."""
        if len(replies) < 4 * self.num_malicious + 3:
            kept = np.zeros(len(replies), dtype=bool)
            return (numpy_to_arrays(self.global_state), self.train_metrics(replies),
                    Decision(kept=kept, info={"num_malicious": self.num_malicious, "skipped": True}))
        aggregate, metrics, decision = super().aggregate_rule(server_round, replies)
        assert decision is not None
        decision.weights = None  # coordinate-wise on the theta selected: `kept` is the client-level decision
        return aggregate, metrics, decision

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        """Bulyan's update.

        The decision's weights (the selected clients' example weights) average the BatchNorm statistics.
        """
        out = bulyan(updates, self.num_malicious)
        weights = np.where(out.kept, self.example_weights(replies), 0.0)
        return out.delta, Decision(weights=weights / weights.sum(), kept=out.kept,
                                   info={"num_malicious": self.num_malicious, "skipped": False})
