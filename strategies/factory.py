"""The one place where a config becomes a strategy.

`build_strategy` reads `defense.*` and the federation settings and passes explicit keyword arguments to
the class registered under `defense.name`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flip_fl.config import Config, assumed_malicious, round_sampler
from flip_fl.data import load_datasets
from flip_fl.defenses.fltrust import root_split
from flip_fl.device import torch_device
from flip_fl.models import build_model
from flip_fl.registry import DEFENSES
from flip_fl.training import LocalTraining
from strategies.seeded_fedavg import SeededFedAvg


def federation_options(cfg: Config, node_partitions: Mapping[int, int],
                       shared_config: Mapping[str, str]) -> dict[str, Any]:
    """The keyword arguments of `SeededFedAvg` (every strategy takes them)."""
    return {"node_partitions": node_partitions, "sampler": round_sampler(cfg), "benign_client": cfg.clients.benign,
            "malicious_client": cfg.attack.client, "server_lr": cfg.server.lr, "weighted": cfg.server.weighted,
            "shared_config": shared_config, "round_timeout": cfg.resources.round_timeout,
            "min_clients": cfg.server.min_clients}


def defense_options(cfg: Config) -> dict[str, Any]:
    """The keyword arguments of the defense `defense.name` (its own parameters, f resolved)."""
    d, name = cfg.defense, cfg.defense.name
    if name == "krum":
        return {"num_malicious": assumed_malicious(cfg)}
    if name == "bulyan":
        return {"num_malicious": assumed_malicious(cfg), "selection": d.bulyan_selection}
    if name == "multikrum":
        return {"num_malicious": assumed_malicious(cfg), "num_selected": d.multikrum_select}
    if name == "trimmed_mean":
        return {"beta": d.trim_beta}
    if name == "norm_clip":
        return {"clip_norm": d.clip_norm}
    if name == "weak_dp":
        return {"clip_norm": d.clip_norm, "noise_std": d.noise_std, "seed": cfg.seed}
    if name == "rfa":
        return {"iters": d.rfa_iters}
    if name == "foolsgold":
        return {"features": d.foolsgold_features, "confidence": d.foolsgold_confidence}
    if name == "rlr":
        return {"threshold": d.rlr_threshold if d.rlr_threshold is not None else assumed_malicious(cfg) + 1}
    if name == "fltrust":
        return fltrust_options(cfg)
    if name == "flame":
        return {"flame_lambda": d.flame_lambda, "seed": cfg.seed}
    return {}


def fltrust_options(cfg: Config) -> dict[str, Any]:
    """FLTrust's root data (a seeded draw from the test set), trainer (`client.*`), model and device."""
    test = load_datasets(cfg)[1]
    root = test.subset(root_split(cfg, len(test))[0])
    return {"root": root, "trainer": LocalTraining.from_config(cfg.client),
            "model_fn": lambda: build_model(cfg.model, root), "device": torch_device(cfg.resources.num_gpus),
            "seed": cfg.seed}


def build_strategy(cfg: Config, node_partitions: Mapping[int, int], shared_config: Mapping[str, str]) -> SeededFedAvg:
    """The strategy `defense.name` asks for, wired to the run's node -> partition map."""
    cls = DEFENSES.lookup(cfg.defense.name)
    strategy: SeededFedAvg = cls(**federation_options(cfg, node_partitions, shared_config), **defense_options(cfg))
    return strategy
