"""FedAvg with reproducible sampling, attacker roles, failure accounting and a server learning rate."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flip_fl.config import Config
from flip_fl.defenses.updates import apply_server_lr
from flip_fl.federation.rounds import RoundRecord, short_reason
from flip_fl.federation.schedule import is_attack_round, malicious_ids, sample_round


class RoundFailedError(RuntimeError):
    """Every sampled client of a round failed: there is nothing to aggregate."""


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ordered dict of numpy arrays."""
    return {k: v.numpy() for k, v in arrays.items()}


def numpy_to_arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    """Ordered dict of numpy arrays -> ArrayRecord."""
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in state.items()})


class SeededFedAvg(FedAvg):
    """FedAvg whose rounds can be repeated exactly and whose update rule is `global += eta * agg_delta`.

    - Sampling: `flip_fl.schedule.sample_round` (seeded, ordered by partition id, attackers forced
      into their attack rounds when configured) instead of Flower's unseeded draw.
    - Roles: each sampled node gets its own ConfigRecord naming its client class and attack flags.
    - Aggregation: replies are sorted by partition id, failures counted (a round where every client
      failed raises `RoundFailedError`), then `super().aggregate_train` computes the aggregate model
      (FedAvg's mean here; Krum, median, ... in subclasses that put a Flower strategy next in the MRO)
      and the server learning rate is applied to the difference from the global model.
    - Weighting: by "num-examples" (server.weighted) or by "unit-weight" (a plain mean).
    """

    def __init__(self, cfg: Config, node_partitions: dict[int, int], base_config: dict[str, str],
                 **kwargs: object) -> None:
        kwargs.setdefault("weighted_by_key", "num-examples" if cfg.server.weighted else "unit-weight")
        super().__init__(fraction_evaluate=0.0, min_available_nodes=len(node_partitions), **kwargs)
        self.cfg = cfg
        self.partition_of = dict(node_partitions)
        self.node_of = {pid: node for node, pid in node_partitions.items()}
        self.base_config = base_config
        self.rounds: dict[int, RoundRecord] = {}
        self.global_state: dict[str, np.ndarray] = {}

    def client_config(self, server_round: int, partition_id: int) -> ConfigRecord:
        """The per-node train config: shared settings plus this partition's role."""
        bad = malicious_ids(self.cfg)
        is_bad = partition_id in bad
        return ConfigRecord({
            **self.base_config,
            "server-round": server_round,
            "client-class": self.cfg.attack.client if is_bad else self.cfg.clients.benign,
            "malicious": is_bad,
            "attacking": is_attack_round(self.cfg, partition_id, server_round),
            "attacker-index": bad.index(partition_id) if is_bad else -1,
        })

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_state = arrays_to_numpy(arrays)
        sampled = sample_round(self.cfg, server_round, sorted(self.node_of))
        bad = set(malicious_ids(self.cfg))
        self.rounds[server_round] = RoundRecord(
            sampled=sampled, malicious=[p for p in sampled if p in bad],
            attacking=[p for p in sampled if is_attack_round(self.cfg, p, server_round)], started=time.time())
        return [Message(RecordDict({self.arrayrecord_key: arrays,
                                    self.configrecord_key: self.client_config(server_round, pid)}),
                        message_type=MessageType.TRAIN, dst_node_id=self.node_of[pid]) for pid in sampled]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self.rounds[server_round]
        replies = list(replies)
        ok = sorted((m for m in replies if not m.has_error()), key=lambda m: self.partition_of[m.metadata.src_node_id])
        answered = {self.partition_of[m.metadata.src_node_id] for m in replies}
        record.failed = sorted({self.partition_of[m.metadata.src_node_id] for m in replies if m.has_error()}
                               | (set(record.sampled) - answered))
        record.failures = len(record.failed)
        record.errors = [short_reason(m.error.reason) for m in replies if m.has_error()][:5]
        if not ok:
            timeout = self.cfg.resources.round_timeout
            reasons = "; ".join(record.errors) or f"no reply within resources.round_timeout ({timeout:g}s)"
            raise RoundFailedError(f"round {server_round}: all {len(record.sampled)} sampled clients failed: {reasons}")
        for m in ok:
            record.client_metrics[self.partition_of[m.metadata.src_node_id]] = {
                k: float(v) for k, v in m.content.config_records["client-metrics"].items()}
        aggregate, metrics = self.aggregate_models(server_round, ok)
        new_state = apply_server_lr(self.global_state, arrays_to_numpy(aggregate), self.cfg.server.lr)
        return numpy_to_arrays(new_state), metrics

    def aggregate_models(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None]:
        """The aggregate client model before the server learning rate (Flower's rule via the MRO)."""
        aggregate, metrics = super().aggregate_train(server_round, replies)
        assert aggregate is not None  # replies are non-empty and error-free here
        return aggregate, metrics
