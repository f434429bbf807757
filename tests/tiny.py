"""A tiny synthetic configuration shared by tests."""

from __future__ import annotations

import json
from typing import Any

from flip_fl.config import Config, apply_overrides, config_from_dict

TINY = {
    "seed": 0,
    "data": {"name": "synthetic", "synthetic": {"train_size": 2400, "test_size": 300}},
    "model": {"name": "tiny_cnn"},
    "federation": {"num_clients": 6, "clients_per_round": 4, "num_rounds": 3},
    "training": {"batch_size": 32, "lr": 0.05, "local_epochs": 2},
}


def tiny_config(*overrides: str, base: dict[str, Any] | None = None) -> Config:
    """A validated tiny synthetic Config with `key.path=value` overrides applied."""
    raw = json.loads(json.dumps(base or TINY))
    return config_from_dict(apply_overrides(raw, list(overrides)))
