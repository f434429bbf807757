"""Defenses that select clients with Flower's own rules: Krum, Multi-Krum and Bulyan.

Flower aggregates client MODELS; Krum distances, coordinate medians and trimmed means are
translation invariant, so on models they equal global + (the same rule on the updates).
The Krum family selects on the trained parameters only: BatchNorm statistics (running mean/var and
the batch counters, which differ by the number of local steps and would dominate the distances) are
left out of what Flower sees and averaged over the selected clients afterwards.
Detection: the selection is read from the contents Flower hands to its metrics aggregation (exactly the
selected replies).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, Krum, MultiKrum
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from flip_fl.config import Config
from flip_fl.defenses.updates import BN_STATISTIC_SUFFIXES
from strategies.defense import Decision, DefenseStrategy, assumed_malicious
from strategies.seeded_fedavg import numpy_to_arrays


class _SelectionDefense(DefenseStrategy):
    """Records which reply contents Flower's rule selected (Krum, Multi-Krum, Bulyan)."""

    def __init__(self, cfg: Config, node_partitions: dict[int, int], base_config: dict[str, str],
                 **kwargs: Any) -> None:
        self.num_assumed = assumed_malicious(cfg)
        super().__init__(cfg, node_partitions, base_config, num_malicious_nodes=self.num_assumed, **kwargs)
        self.train_metrics_aggr_fn = self._metrics_of_selected
        self._selected: set[int] = set()

    def _metrics_of_selected(self, contents: list[RecordDict], weighting_key: str) -> MetricRecord:
        self._selected = {id(c) for c in contents}
        return aggregate_metricrecords(contents, weighting_key)

    def aggregate_rule(self, server_round: int,
                       replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None, Decision | None]:
        stats = [k for k in self.global_state if k.rsplit(".", 1)[-1] in BN_STATISTIC_SUFFIXES]
        views = [self._without(m, stats) for m in replies] if stats else replies
        self._selected = set()
        aggregate, metrics, _ = super().aggregate_rule(server_round, views)
        kept = np.array([id(m.content) in self._selected for m in views])
        weights = self.selection_weights(replies, kept)
        for key in stats:
            values = [m.content[self.arrayrecord_key][key].numpy().astype(np.float64) for m in replies]
            aggregate[key] = Array(np.asarray(sum(w * v for w, v in zip(weights, values) if w > 0)))
        return aggregate, metrics, Decision(weights=weights, kept=kept, info={"num_malicious": self.num_assumed})

    def _without(self, reply: Message, keys: list[str]) -> Message:
        """A view of `reply` whose model lacks `keys` (the Array objects are shared, not copied)."""
        content = RecordDict(dict(reply.content.items()))
        arrays = reply.content[self.arrayrecord_key]
        content[self.arrayrecord_key] = ArrayRecord({k: v for k, v in arrays.items() if k not in keys})
        return Message(content, metadata=reply.metadata)

    def selection_weights(self, replies: list[Message], kept: np.ndarray) -> np.ndarray:
        """Coefficients of the selected replies in Flower's (weighted) average."""
        w = np.where(kept, self.example_weights(replies), 0.0)
        return w / w.sum()


class KrumDefense(_SelectionDefense, Krum):
    """Krum (Blanchard et al. 2017): the single update closest to its n - f - 2 neighbours."""

    name = "krum"


class MultiKrumDefense(_SelectionDefense, MultiKrum):
    """Multi-Krum: the (example-weighted) mean of the m lowest-scoring updates (m = n - f by default)."""

    name = "multikrum"

    def aggregate_rule(self, server_round: int,
                       replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None, Decision | None]:
        n = len(replies)
        wanted = self.cfg.defense.multikrum_select
        self.num_nodes_to_select = max(1, min(n, wanted if wanted is not None else n - self.num_assumed))
        return super().aggregate_rule(server_round, replies)


class BulyanDefense(_SelectionDefense, Bulyan):
    """Bulyan (El Mhamdi et al. 2018) as Flower implements it.

    One-shot Multi-Krum selection of theta = n - 2f updates, then per coordinate the mean of the beta = theta
    - 2f values closest to the median. A round with fewer than 4f + 3 replies (client failures) keeps the
    global model.
    """

    name = "bulyan"

    def aggregate_rule(self, server_round: int,
                       replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None, Decision | None]:
        if len(replies) < 4 * self.num_assumed + 3:
            kept = np.zeros(len(replies), dtype=bool)
            return (numpy_to_arrays(self.global_state), self.train_metrics(replies),
                    Decision(kept=kept, info={"num_malicious": self.num_assumed, "skipped": True}))
        aggregate, metrics, decision = super().aggregate_rule(server_round, replies)
        assert decision is not None
        decision.weights = None  # coordinate-wise on the theta selected: `kept` is the client-level decision
        decision.info["skipped"] = False
        return aggregate, metrics, decision
