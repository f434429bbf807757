"""The Flower ClientApp: dispatches each training message to the client class the server named.

Runs inside Ray actors that serve many partitions, so nothing per-client lives in module globals:
the dataset cache is keyed by config, per-client state travels in `context.state`.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flip_fl.config import Config, from_yaml
from flip_fl.data import client_dataset
from flip_fl.federation.client import ClientState, RoundInfo, load_client_class

STATE_ARRAYS = "flipfl-state-arrays"
STATE_VALUES = "flipfl-state-values"

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _config(text: str) -> Config:
    return from_yaml(text)


def _partition_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


def read_state(context: Context) -> ClientState:
    """This node's persistent client state (empty on its first round)."""
    state = ClientState()
    if STATE_ARRAYS in context.state.array_records:
        state.arrays = {k: v.numpy() for k, v in context.state.array_records[STATE_ARRAYS].items()}
    if STATE_VALUES in context.state.config_records:
        state.values = dict(context.state.config_records[STATE_VALUES])
    return state


def write_state(context: Context, state: ClientState) -> None:
    """Store the client state back into the node's context for its next round."""
    context.state[STATE_ARRAYS] = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in state.arrays.items()})
    context.state[STATE_VALUES] = ConfigRecord(dict(state.values))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    return Message(RecordDict({"info": ConfigRecord({"partition-id": _partition_id(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Build the named client class on this partition, fit it, and reply with its model."""
    conf = msg.content["config"]
    cfg = _config(str(conf["flipfl-config"]))
    pid = _partition_id(context)
    torch.set_num_threads(max(1, int(cfg.resources.num_cpus)))
    use_cuda = cfg.resources.num_gpus > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    cls = load_client_class(str(conf["client-class"]), "client-class")
    client = cls(cfg, pid, client_dataset(cfg, pid), device, read_state(context),
                 Path(str(conf["workdir"])) / f"partition-{pid:04d}")
    attacker_index = int(conf["attacker-index"])
    info = RoundInfo(server_round=int(conf["server-round"]), malicious=bool(conf["malicious"]),
                     attacking=bool(conf["attacking"]), attacker_index=attacker_index if attacker_index >= 0 else None)
    start = time.perf_counter()
    result = client.fit(msg.content["arrays"].to_torch_state_dict(), info)
    result.metrics.setdefault("train_seconds", time.perf_counter() - start)
    write_state(context, client.state)
    weights = MetricRecord({"num-examples": int(result.num_examples), "unit-weight": 1})
    metrics = ConfigRecord({k: float(v) for k, v in result.metrics.items()})
    return Message(RecordDict({"arrays": ArrayRecord(result.state), "weights": weights, "client-metrics": metrics}),
                   reply_to=msg)
