"""Defenses that select clients: Krum, Multi-Krum and Bulyan.

The rules are the numpy functions `flip_fl.defenses.krum.krum` and `flip_fl.defenses.bulyan.bulyan`, on
float64 updates with exact pairwise distances; they return which clients they selected. They see the
trained parameters' updates only: BatchNorm statistics (running mean/var and the batch counters, which
differ by the number of local steps and would dominate the distances) are averaged over the selected
clients afterwards, with the selection's (example) weights.

Each rule has a bound on the replies it needs for f assumed attackers (Krum: n > 2f + 2, Bulyan:
n >= 4f + 3). The config guarantees it for the sampled clients; a round whose valid replies fall below
it (client failures) keeps the global model and is recorded as skipped, never as a decision.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from flip_fl.defenses.bulyan import Selection, bulyan
from flip_fl.defenses.krum import krum
from flip_fl.registry import DEFENSES
from strategies.defense import Decision, DeltaDefense
from strategies.seeded_fedavg import numpy_to_arrays


class SelectionDefense(DeltaDefense):
    """A rule that needs at least `minimum_replies()` replies for f = `num_malicious`; rounds with fewer are skipped.

    Args:
        num_malicious: f, the number of malicious clients the rule assumes.
        **kwargs: those of `SeededFedAvg`.
    """

    bound: str = ""

    def __init__(self, *, num_malicious: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_malicious = num_malicious

    def minimum_replies(self) -> int:
        """The fewest replies the rule's guarantee holds for."""
        raise NotImplementedError

    def aggregate_rule(self, server_round: int,
                       replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None, Decision | None]:
        """The rule on the updates, or the global model (a skipped round) when too few clients replied."""
        info: dict[str, Any] = {"num_malicious": self.num_malicious}
        if len(replies) < self.minimum_replies():
            reason = (f"{len(replies)} valid replies; {self.name} with f = {self.num_malicious} needs "
                      f"{self.bound} = {self.minimum_replies()}")
            return (numpy_to_arrays(self.global_state), self.train_metrics(replies),
                    Decision(skipped=reason, info=info))
        aggregate, metrics, decision = super().aggregate_rule(server_round, replies)
        assert decision is not None
        decision.info = {**info, **decision.info, "skipped": False}
        return aggregate, metrics, decision


@DEFENSES.register("krum")
class KrumDefense(SelectionDefense):
    """Krum (Blanchard et al. 2017): the single update closest to its n - f - 2 neighbours.

    Args:
        num_malicious: f, the number of malicious clients the rule assumes.
        **kwargs: those of `SeededFedAvg`.
    """

    name = "krum"
    bound = "2f + 3"

    def minimum_replies(self) -> int:
        """Krum's n > 2f + 2."""
        return 2 * self.num_malicious + 3

    def num_selected(self, num_replies: int) -> int:
        """How many updates the rule averages (one for Krum)."""
        return 1

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        """The selected updates' (example-weighted) mean; the decision names them."""
        out = krum(updates, self.num_malicious, multi_k=self.num_selected(len(replies)),
                   weights=self.example_weights(replies))
        return out.delta, Decision(weights=out.weights, kept=out.kept)


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
class BulyanDefense(SelectionDefense):
    """Bulyan (El Mhamdi et al. 2018).

    Krum-based selection of theta = n - 2f updates (the paper's iterated Krum, or Flower's one-shot
    Multi-Krum with `selection="one_shot"`), then per coordinate the mean of the beta = theta - 2f values
    closest to the median.

    Args:
        num_malicious: f.
        selection: "iterated" (the paper) or "one_shot" (Flower's `Bulyan`).
        **kwargs: those of `SeededFedAvg`.
    """

    name = "bulyan"
    bound = "4f + 3"

    def __init__(self, *, num_malicious: int, selection: Selection = "iterated", **kwargs: Any) -> None:
        super().__init__(num_malicious=num_malicious, **kwargs)
        self.selection = selection

    def minimum_replies(self) -> int:
        """Bulyan's n >= 4f + 3."""
        return 4 * self.num_malicious + 3

    def aggregate_rule(self, server_round: int,
                       replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None, Decision | None]:
        """Bulyan on the updates; `kept` is the client-level decision (the second stage is per coordinate)."""
        aggregate, metrics, decision = super().aggregate_rule(server_round, replies)
        if decision is not None and decision.skipped is None:
            decision.weights = None  # coordinate-wise on the theta selected: `kept` is the client-level decision
        return aggregate, metrics, decision

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        """Bulyan's update.

        The decision's weights (the selected clients' example weights) average the BatchNorm statistics.
        """
        out = bulyan(updates, self.num_malicious, self.selection)
        weights = np.where(out.kept, self.example_weights(replies), 0.0)
        return out.delta, Decision(weights=weights / weights.sum(), kept=out.kept,
                                   info={"selection": self.selection})
