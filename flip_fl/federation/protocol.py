"""The messages between the server and the clients: every record key, and the codecs that read and write them.

- QUERY: the server asks each node which data partition it holds (`partition_reply`, `read_partition`).
- TRAIN: the strategy sends the global model and a per-node config (`train_config`): the run's config as
  YAML, the clients' work directory, the round and the node's role (`RoundInfo`) and client class; the
  ClientApp reads it back with `read_train_config` and answers with `fit_reply` (the local model, the
  aggregation weights and the client's metrics). The server checks every reply with `check_fit_reply`
  before it aggregates anything: a client can send anything.
- Per-partition state that persists across rounds (`ClientState`) travels with the TRAIN message and comes
  back, updated, in its reply (`write_state`, `read_state`, `take_state`). The server keeps every
  partition's state and writes it into the run's checkpoint, so a resumed run gets it back; Flower's
  `context.state` lives in memory only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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


def check_fit_reply(content: RecordDict, template: Mapping[str, np.ndarray]) -> str | None:
    """Why a TRAIN reply cannot be aggregated (one short line), or None when it is well-formed.

    Well-formed is what `fit_reply` writes and nothing else: the model (every entry of `template`, the
    global model, with its shape and dtype, floats all finite, no other entry), the aggregation weights
    (a positive, finite `num-examples` and a `unit-weight` of 1) and client metrics that are finite
    numbers. The server counts any other reply as a failed client, so that no rule ever sees it.
    """
    expected = {ARRAYS: "ArrayRecord", WEIGHTS: "MetricRecord", CLIENT_METRICS: "ConfigRecord"}
    kinds = {**{k: "ArrayRecord" for k in content.array_records}, **{k: "MetricRecord" for k in content.metric_records},
             **{k: "ConfigRecord" for k in content.config_records}}
    for name, kind in expected.items():
        if kinds.get(name) != kind:
            return f"reply has no {kind} {name!r}" + (f" (it is a {kinds[name]})" if name in kinds else "")
    extra = sorted(set(kinds) - set(expected))
    if extra:
        return f"reply has unexpected record {extra[0]!r}"
    return (_check_arrays(content.array_records[ARRAYS], template) or _check_weights(content.metric_records[WEIGHTS])
            or _check_metrics(content.config_records[CLIENT_METRICS]))


def _check_arrays(record: ArrayRecord, template: Mapping[str, np.ndarray]) -> str | None:
    """The model entries against the global model's: names, shapes, dtypes, finite values."""
    missing = [k for k in template if k not in record]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"model entry {missing[0]!r} is missing{more}"
    extra = [k for k in record if k not in template]
    if extra:
        return f"model has an unexpected entry {extra[0]!r}"
    for k, ref in template.items():
        try:
            value = record[k].numpy()
        except Exception as err:  # any decoding failure is the client's fault; its message is not repeated
            return f"model entry {k!r} cannot be decoded ({type(err).__name__})"
        if value.shape != ref.shape or value.dtype != ref.dtype:
            return f"model entry {k!r} is {value.dtype} {tuple(value.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            return f"model entry {k!r} has {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf)"
    return None


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_weights(record: MetricRecord) -> str | None:
    """The aggregation weights: exactly num-examples (> 0) and unit-weight (1)."""
    if set(record) != {NUM_EXAMPLES, UNIT_WEIGHT}:
        return f"weights must hold exactly {NUM_EXAMPLES!r} and {UNIT_WEIGHT!r}, not {sorted(record)}"
    examples = record[NUM_EXAMPLES]
    if not _finite_number(examples) or examples <= 0:  # type: ignore[operator]
        return f"weights: {NUM_EXAMPLES} = {examples!r} is not a positive finite number"
    if record[UNIT_WEIGHT] != 1:
        return f"weights: {UNIT_WEIGHT} = {record[UNIT_WEIGHT]!r} is not 1"
    return None


def _check_metrics(record: ConfigRecord) -> str | None:
    """Client metrics: finite numbers only."""
    for k, v in record.items():
        if not _finite_number(v):
            return f"client metric {k!r} = {str(v)[:40]!r} is not a finite number"
    return None


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
