"""The messages between the server and the clients: every record key, and the codecs that read and write them.

- QUERY: the server asks each node which data partition it holds (`partition_reply`, `read_partition`).
- TRAIN: the strategy sends the global model and a per-node config (`train_config`): the run's config as
  YAML, the clients' work directory, the round and the node's role (`RoundInfo`) and client class; the
  ClientApp reads it back with `read_train_config` and answers with `fit_reply` (the local model, the
  aggregation weights and the client's metrics).
- Per-partition state that persists across rounds (`ClientState`) travels with the TRAIN message and comes
  back, updated, in its reply (`write_state`, `read_state`, `take_state`). The server keeps every
  partition's state and writes it into the run's checkpoint, so a resumed run gets it back; Flower's
  `context.state` lives in memory only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

Scalar = int | float | str | bool
StateDict = dict[str, torch.Tensor]

# content of a TRAIN message and of its reply
ARRAYS = "arrays"
"""The model: the global model in a TRAIN message, the local model in its reply (Flower's default key)."""
CONFIG = "config"
"""The per-node ConfigRecord of a TRAIN message (Flower's default key)."""
WEIGHTS = "weights"
"""The reply's MetricRecord of aggregation weights."""
NUM_EXAMPLES = "num-examples"
"""Weight of an example-weighted mean (`server.weighted: true`)."""
UNIT_WEIGHT = "unit-weight"
"""Weight of a plain mean (`server.weighted: false`)."""
CLIENT_METRICS = "client-metrics"
"""The reply's ConfigRecord of client metrics (train loss, timings, attack facts)."""

# keys of the per-node train ConfigRecord
RUN_CONFIG = "flipfl-config"
WORKDIR = "workdir"
SERVER_ROUND = "server-round"
CLIENT_CLASS = "client-class"
MALICIOUS = "malicious"
ATTACKING = "attacking"
ATTACKER_INDEX = "attacker-index"

# QUERY reply
INFO = "info"
PARTITION_ID = "partition-id"
"""Also the key of Flower's `context.node_config` that holds a simulated node's partition."""

# per-partition client state, in a TRAIN message and its reply
STATE_ARRAYS = "flipfl-state-arrays"
STATE_VALUES = "flipfl-state-values"


@dataclass
class RoundInfo:
    """What the server tells a client about this round."""

    server_round: int
    malicious: bool
    attacking: bool
    attacker_index: int | None


@dataclass
class ClientState:
    """Per-partition state that persists across rounds (small: it travels with every TRAIN message and reply)."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class FitResult:
    """A client's reply: its local model, the example count used for weighting, and metrics."""

    state: StateDict
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainTask:
    """A TRAIN message as the client sees it: which class to build, the run's config, where to work, the round."""

    client_class: str
    run_config: str
    workdir: str
    info: RoundInfo


def shared_config(run_config_yaml: str, workdir: str) -> dict[str, str]:
    """The part of the train config every node gets: the run's config as YAML and the clients' work directory."""
    return {RUN_CONFIG: run_config_yaml, WORKDIR: workdir}


def train_config(shared: dict[str, str], client_class: str, info: RoundInfo) -> ConfigRecord:
    """The per-node train config: the shared settings plus this node's round, role and client class."""
    return ConfigRecord({
        **shared,
        SERVER_ROUND: info.server_round,
        CLIENT_CLASS: client_class,
        MALICIOUS: info.malicious,
        ATTACKING: info.attacking,
        ATTACKER_INDEX: info.attacker_index if info.attacker_index is not None else -1,
    })


def read_train_config(record: ConfigRecord) -> TrainTask:
    """Inverse of `train_config` on the client side."""
    index = int(record[ATTACKER_INDEX])  # type: ignore[arg-type]
    info = RoundInfo(server_round=int(record[SERVER_ROUND]), malicious=bool(record[MALICIOUS]),  # type: ignore[arg-type]
                     attacking=bool(record[ATTACKING]), attacker_index=index if index >= 0 else None)
    return TrainTask(str(record[CLIENT_CLASS]), str(record[RUN_CONFIG]), str(record[WORKDIR]), info)


def fit_reply(result: FitResult, state: ClientState) -> RecordDict:
    """The reply to a TRAIN message: local model, aggregation weights, client metrics and the client's state."""
    weights = MetricRecord({NUM_EXAMPLES: int(result.num_examples), UNIT_WEIGHT: 1})
    metrics = ConfigRecord({k: float(v) for k, v in result.metrics.items()})
    content = RecordDict({ARRAYS: ArrayRecord(result.state), WEIGHTS: weights, CLIENT_METRICS: metrics})
    write_state(content, state)
    return content


def read_client_metrics(content: RecordDict) -> dict[str, float]:
    """The client metrics of a TRAIN reply."""
    return {k: float(v) for k, v in content.config_records[CLIENT_METRICS].items()}  # type: ignore[arg-type]


def partition_reply(partition_id: int) -> RecordDict:
    """A node's answer to the start-up QUERY: its data partition."""
    return RecordDict({INFO: ConfigRecord({PARTITION_ID: partition_id})})


def read_partition(content: RecordDict) -> int:
    """The partition id of a QUERY reply."""
    return int(content.config_records[INFO][PARTITION_ID])  # type: ignore[arg-type]


def read_state(records: RecordDict) -> ClientState:
    """The client state in a message's content; empty when there is none."""
    state = ClientState()
    if STATE_ARRAYS in records.array_records:
        state.arrays = {k: v.numpy() for k, v in records.array_records[STATE_ARRAYS].items()}
    if STATE_VALUES in records.config_records:
        state.values = dict(records.config_records[STATE_VALUES])  # type: ignore[arg-type]
    return state


def write_state(records: RecordDict, state: ClientState) -> None:
    """Put a client state into a message's content."""
    records[STATE_ARRAYS] = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in state.arrays.items()})
    records[STATE_VALUES] = ConfigRecord(dict(state.values))


def take_state(content: RecordDict) -> ClientState | None:
    """Remove the client state from a TRAIN reply and return it (None when the reply carries none).

    The server takes it out before the strategy sees the reply: Flower's aggregation expects exactly one
    ArrayRecord per reply.
    """
    if STATE_ARRAYS not in content.array_records:
        return None
    state = read_state(content)
    del content[STATE_ARRAYS]
    if STATE_VALUES in content.config_records:
        del content[STATE_VALUES]
    return state
