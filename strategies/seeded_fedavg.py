"""FedAvg with reproducible sampling, attacker roles, failure accounting and a server learning rate."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flip_fl.config import Config
from flip_fl.config.schema import NoParams
from flip_fl.defenses.updates import apply_server_lr
from flip_fl.federation import protocol
from flip_fl.federation.failures import no_reply_reason
from flip_fl.federation.rounds import RoundRecord
from flip_fl.schedule import RoundSampler


class RoundFailedError(RuntimeError):
    """A round cannot produce a trustworthy global model: too few valid replies, or a non-finite aggregate."""


def required_replies(min_clients: int | float, sampled: int) -> int:
    """Valid replies a round needs: `min_clients` as a count (int) or a fraction of the sampled clients (float)."""
    if isinstance(min_clients, float):
        return max(1, math.ceil(min_clients * sampled - 1e-9))
    return max(1, min(int(min_clients), sampled))


def failure_summary(record: RoundRecord, valid: int, needed: int) -> str:
    """One line on a round with too few valid replies: how many, what was needed, the first reasons."""
    n = len(record.sampled)
    head = (f"all {n} sampled clients failed" if valid == 0 else
            f"only {valid} of {n} sampled clients sent a valid reply, server.min_clients asks for {needed}")
    more = f"; ... ({len(record.errors) - 3} more)" if len(record.errors) > 3 else ""
    return f"{head}: {'; '.join(record.errors[:3])}{more}"


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ordered dict of numpy arrays."""
    return {k: v.numpy() for k, v in arrays.items()}


def numpy_to_arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    """Ordered dict of numpy arrays -> ArrayRecord."""
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in state.items()})


class SeededFedAvg(FedAvg):
    """FedAvg whose rounds can be repeated exactly and whose update rule is `global += eta * agg_delta`.

    - Sampling: `sampler` (`flip_fl.schedule.RoundSampler`: seeded, ordered by partition id,
      attackers forced into their attack rounds when configured) instead of Flower's unseeded draw.
    - Roles: each sampled node gets its own ConfigRecord naming its client class and attack flags
      (`flip_fl.federation.protocol.train_config`); `shared_config` goes to every node.
    - Screening: every reply is checked (`protocol.check_fit_reply`) before any rule sees it; error
      replies, malformed or non-finite ones and missing replies are failed clients, counted with their
      reason. A round with fewer than `min_clients` valid replies raises `RoundFailedError` (the run
      fails) rather than aggregating what is left, e.g. the attackers alone.
    - Aggregation: the valid replies, sorted by partition id, go to `aggregate_models`, which computes
      the aggregate model (FedAvg's mean here; Krum, median, ... in the defenses), and the server
      learning rate `server_lr` is applied to the difference from the global model.
    - Weighting: by "num-examples" (`weighted`) or by "unit-weight" (a plain mean).

    Args:
        node_partitions: node id -> partition id, from the start-up query.
        sampler: who is sampled in each round (and who attacks when).
        benign_client: dotted path of the benign client class.
        malicious_client: dotted path of the malicious client class.
        server_lr: the server learning rate eta.
        weighted: weight client updates by their number of examples.
        shared_config: settings every node gets in its train config (`protocol.shared_config`).
        round_timeout: seconds a round may take (for the error message of a round without replies).
        min_clients: valid replies a round needs, a count (int) or a fraction of the sampled clients (float).
        **kwargs: passed on to the Flower strategy next in the MRO.
    """

    def __init__(self, *, node_partitions: Mapping[int, int], sampler: RoundSampler, benign_client: str,
                 malicious_client: str, server_lr: float = 1.0, weighted: bool = True,
                 shared_config: Mapping[str, str] | None = None, round_timeout: float = 1800.0,
                 min_clients: int | float = 1, **kwargs: Any) -> None:
        kwargs.setdefault("weighted_by_key", protocol.NUM_EXAMPLES if weighted else protocol.UNIT_WEIGHT)
        super().__init__(fraction_evaluate=0.0, min_available_nodes=len(node_partitions), **kwargs)
        self.partition_of = dict(node_partitions)
        self.node_of = {pid: node for node, pid in node_partitions.items()}
        self.sampler = sampler
        self.schedule = sampler.schedule
        self.benign_client = benign_client
        self.malicious_client = malicious_client
        self.server_lr = server_lr
        self.shared_config = dict(shared_config or {})
        self.round_timeout = round_timeout
        self.min_clients = min_clients
        self.rounds: dict[int, RoundRecord] = {}
        self.global_state: dict[str, np.ndarray] = {}

    name: ClassVar[str] = ""
    """The `defense.name` the class is registered under (set by `flip_fl.registry.DEFENSES.register`)."""
    Params: ClassVar[type] = NoParams
    """The dataclass of the strategy's config keys, `defense.<name>.*` (`flip_fl.config.key` fields)."""

    @classmethod
    def check(cls, params: Any, cfg: Config) -> None:
        """Rules of `params` that involve other config keys; raise `ConfigError` naming the key."""

    @classmethod
    def options(cls, params: Any, cfg: Config) -> dict[str, Any]:
        """The constructor's keyword arguments beside those of `SeededFedAvg`, for a run of `cfg`.

        The params themselves by default; override it when an argument is resolved from the run (f from the
        attack schedule, the seed, the server's own data).
        """
        return dataclasses.asdict(params)

    @classmethod
    def held_out(cls, params: Any, cfg: Config, test_size: int) -> npt.NDArray[np.int64] | None:
        """Indices of test images the strategy keeps for the server, excluded from evaluation (None: none)."""
        return None

    def client_config(self, server_round: int, partition_id: int) -> ConfigRecord:
        """The per-node train config: shared settings plus this partition's role."""
        index = self.schedule.attacker_index(partition_id)
        info = protocol.RoundInfo(server_round=server_round, malicious=index is not None,
                                  attacking=self.schedule.is_attack_round(partition_id, server_round),
                                  attacker_index=index)
        client_class = self.malicious_client if index is not None else self.benign_client
        return protocol.train_config(self.shared_config, client_class, info)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample the round's clients and send each the global model and its own train config."""
        self.global_state = arrays_to_numpy(arrays)
        sampled = self.sampler.sample(server_round, sorted(self.node_of))
        bad = set(self.schedule.malicious)
        self.rounds[server_round] = RoundRecord(
            sampled=sampled, malicious=[p for p in sampled if p in bad],
            attacking=[p for p in sampled if self.schedule.is_attack_round(p, server_round)], started=time.time())
        return [Message(RecordDict({self.arrayrecord_key: arrays,
                                    self.configrecord_key: self.client_config(server_round, pid)}),
                        message_type=MessageType.TRAIN, dst_node_id=self.node_of[pid]) for pid in sampled]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, aggregate the valid ones in partition order and apply the server learning rate.

        Raises `RoundFailedError` when fewer than `min_clients` replies are valid, or when the new global
        model would not be finite.
        """
        record = self.rounds[server_round]
        valid = self.screen_replies(record, list(replies))
        needed = required_replies(self.min_clients, len(record.sampled))
        if len(valid) < needed:
            raise RoundFailedError(f"round {server_round}: {failure_summary(record, len(valid), needed)}")
        for m in valid:
            record.client_metrics[self.partition_of[m.metadata.src_node_id]] = protocol.read_client_metrics(m.content)
        aggregate, metrics = self.aggregate_models(server_round, valid)
        new_state = apply_server_lr(self.global_state, arrays_to_numpy(aggregate), self.server_lr)
        broken = [k for k, v in new_state.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
        if broken:
            raise RoundFailedError(f"round {server_round}: the new global model is not finite in {broken[0]!r}: the "
                                   f"aggregate update times server.lr ({self.server_lr:g}) overflows "
                                   f"{new_state[broken[0]].dtype}")
        return numpy_to_arrays(new_state), metrics

    def screen_replies(self, record: RoundRecord, replies: list[Message]) -> list[Message]:
        """The well-formed replies in partition order; every other sampled client is recorded as failed.

        A failure is an error reply (the client raised), a reply that `protocol.check_fit_reply` rejects
        (missing, extra, mis-shaped, mistyped or non-finite entries, bad weights or metrics) or no reply at
        all. Each failed client is recorded once with its full reason (`RoundRecord.reasons`); replies
        from nodes that were not sampled and repeated replies are ignored.
        """
        sampled = set(record.sampled)
        reasons: dict[int, str] = {}
        valid: dict[int, Message] = {}
        for m in replies:
            pid = self.partition_of.get(m.metadata.src_node_id)
            if pid is None or pid not in sampled or pid in valid or pid in reasons:
                continue
            reason = (m.error.reason or "" if m.has_error()
                      else protocol.check_fit_reply(m.content, self.global_state))
            if reason is None:
                valid[pid] = m
            else:
                reasons[pid] = reason
        for pid in sampled - set(valid) - set(reasons):
            reasons[pid] = no_reply_reason(self.round_timeout)
        record.reasons = reasons
        return [valid[pid] for pid in sorted(valid)]

    def state_dict(self) -> dict[str, np.ndarray]:
        """What this strategy carries from round to round beyond its constructor arguments, for checkpoints.

        Empty here: sampling, roles and the server step are functions of the seed and the round. A defense
        that accumulates something (FoolsGold's histories) returns it and restores it in `load_state_dict`.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a `state_dict` (a resumed run, before its first round)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint has {sorted(state)[:3]}")

    def aggregate_models(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None]:
        """The aggregate client model before the server learning rate (Flower's rule via the MRO)."""
        aggregate, metrics = super().aggregate_train(server_round, replies)
        assert aggregate is not None  # replies are non-empty and error-free here
        return aggregate, metrics
