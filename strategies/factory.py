"""The one place where a config becomes a strategy: `cls(**federation options, **cls.options(params, cfg))`.

`defense.name` picks the class (a registered name or a dotted path, `flip_fl.registry.DEFENSES`), its
`defense.<name>` section its parameters; no defense is named here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flip_fl.config import Config, defense_params, round_sampler
from flip_fl.data import ImageDataset
from flip_fl.registry import DEFENSES
from strategies.seeded_fedavg import SeededFedAvg


def federation_options(cfg: Config, node_partitions: Mapping[int, int],
                       shared_config: Mapping[str, str]) -> dict[str, Any]:
    """The keyword arguments of `SeededFedAvg` (every strategy takes them)."""
    return {"node_partitions": node_partitions, "sampler": round_sampler(cfg), "benign_client": cfg.roles.benign,
            "malicious_client": cfg.roles.malicious, "server_lr": cfg.server.lr, "weighted": cfg.server.weighted,
            "shared_config": shared_config, "round_timeout": cfg.resources.round_timeout,
            "min_clients": cfg.server.min_clients}


def defense_class(cfg: Config) -> type[SeededFedAvg]:
    """The class `defense.name` names."""
    cls: type[SeededFedAvg] = DEFENSES.lookup(cfg.defense.name)
    return cls


def build_strategy(cfg: Config, node_partitions: Mapping[int, int], shared_config: Mapping[str, str]) -> SeededFedAvg:
    """The strategy `defense.name` asks for, wired to the run's node -> partition map."""
    cls = defense_class(cfg)
    return cls(**federation_options(cfg, node_partitions, shared_config), **cls.options(defense_params(cfg), cfg))


def evaluation_set(cfg: Config, test: ImageDataset) -> ImageDataset:
    """The images the global model is evaluated on: the test set minus those the defense keeps (`held_out`)."""
    held = defense_class(cfg).held_out(defense_params(cfg), cfg, len(test))
    if held is None:
        return test
    return test.subset(np.setdiff1d(np.arange(len(test)), held))
