"""The Flower ClientApp: builds the client class the server named on this node's partition and fits it.

Runs inside Ray actors that serve many partitions, so nothing per-client lives in module globals:
the config and dataset caches are keyed by content, per-client state travels with the TRAIN message and
its reply (the server keeps it and checkpoints it).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flip_fl.config import Config, from_yaml
from flip_fl.data import client_dataset
from flip_fl.device import torch_device
from flip_fl.federation import protocol
from flip_fl.federation.client import load_client_class

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _config(text: str) -> Config:
    return from_yaml(text)


def _partition_id(context: Context) -> int:
    return int(context.node_config[protocol.PARTITION_ID])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    return Message(protocol.partition_reply(_partition_id(context)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Build the named client class on this partition, fit it, and reply with its model."""
    task = protocol.read_train_config(msg.content.config_records[protocol.CONFIG])
    cfg = _config(task.run_config)
    pid = _partition_id(context)
    torch.set_num_threads(max(1, int(cfg.resources.num_cpus)))
    cls = load_client_class(task.client_class, "client-class")
    client = cls(cfg, pid, client_dataset(cfg, pid), torch_device(cfg.resources.num_gpus),
                 protocol.read_state(msg.content), Path(task.workdir) / f"partition-{pid:04d}")
    start = time.perf_counter()
    result = client.fit(msg.content.array_records[protocol.ARRAYS].to_torch_state_dict(), task.info)
    result.metrics.setdefault("train_seconds", time.perf_counter() - start)
    return Message(protocol.fit_reply(result, client.state), reply_to=msg)
