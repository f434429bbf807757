"""The client contract: every client class (benign, malicious, defended, user-written) subclasses BaseClient.

A client is built fresh for each training message with its partition's data and its persistent
`ClientState`, runs `fit`, and is discarded: anything that must survive to the next round goes
into `state` (sent back to the server with the reply, kept there per partition and saved in the run's
checkpoints, so it survives a resume). `workdir` (on disk, per partition) is for caches that are a pure
function of the config and the partition (a resumed run may find files a later, lost round wrote there).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from flip_fl.config import Config, ConfigError
from flip_fl.data import ImageDataset
from flip_fl.errors import one_line
from flip_fl.federation.protocol import ClientState, FitResult, RoundInfo, StateDict
from flip_fl.models import build_model
from flip_fl.registry import import_class
from flip_fl.seeds import ClientStream, torch_generator

__all__ = ["BaseClient", "ClientState", "FitResult", "RoundInfo", "StateDict", "check_client_config",
           "load_client_class"]


class BaseClient(ABC):
    """Base of all clients: holds the config, local data, device, persistent state and a work dir."""

    def __init__(self, cfg: Config, partition_id: int, data: ImageDataset, device: torch.device,
                 state: ClientState, workdir: Path) -> None:
        self.cfg = cfg
        self.partition_id = partition_id
        self.data = data
        self.device = device
        self.state = state
        self.workdir = workdir

    def model_from(self, global_state: StateDict) -> nn.Module:
        """A fresh model on this client's device loaded with the global weights."""
        model = build_model(self.cfg.model, self.data)
        model.load_state_dict(global_state)
        return model.to(self.device)

    def generator(self, server_round: int, stream: int = ClientStream.BATCHES) -> torch.Generator:
        """A torch generator seeded by (seed, round, partition, stream): same run, same draws (`flip_fl.seeds`)."""
        return torch_generator(self.cfg.seed, server_round, self.partition_id, int(stream))

    @abstractmethod
    def fit(self, global_state: StateDict, info: RoundInfo) -> FitResult:
        """Train locally from `global_state` and return the new local model."""


def load_client_class(dotted: str, key_path: str) -> type[BaseClient]:
    """Import `package.module.Class` and check it subclasses BaseClient (a ConfigError naming `key_path` if not)."""
    cls: type[BaseClient] = import_class(dotted, key_path, BaseClient, example="clients.BenignClient")
    return cls


def check_client_config(cls: type[BaseClient], cfg: Config, key_path: str) -> None:
    """Run the class's optional `check_config(cfg)`; anything but a ConfigError it raises is named as one."""
    check = getattr(cls, "check_config", None)
    if check is None:
        return
    try:
        check(cfg)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{key_path}: {cls.__name__}.check_config raised {type(err).__name__}: "
                          f"{one_line(err)}") from None


