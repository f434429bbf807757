"""FedAvg (McMahan et al., AISTATS 2017): no defense, Flower's mean of the client models."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Message, MetricRecord

from flip_fl.registry import DEFENSES
from strategies.seeded_fedavg import SeededFedAvg


@DEFENSES.register("fedavg")
class FedAvgDefense(SeededFedAvg):
    """No defense: Flower's (example-weighted) mean of the client models, no decision recorded.

    The mean is Flower's own (`flwr.serverapp.strategy.FedAvg` on the float32 models), so an undefended run
    is the FedAvg every Flower user knows; its time is the `aggregation_seconds` other defenses compare with.
    """

    def aggregate_models(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None]:
        """Flower's FedAvg aggregate of the replies, timed."""
        start = time.perf_counter()
        aggregate = super().aggregate_models(server_round, replies)
        self.rounds[server_round].extra["aggregation_seconds"] = time.perf_counter() - start
        return aggregate
