"""Server strategies: SeededFedAvg and the defenses built on it, selected by `build_strategy`."""

from __future__ import annotations

from flip_fl.config import Config
from strategies.seeded_fedavg import RoundFailedError, SeededFedAvg


def build_strategy(cfg: Config, node_partitions: dict[int, int], base_config: dict[str, str]) -> SeededFedAvg:
    """The strategy the config asks for, wired to the run's node -> partition map."""
    return SeededFedAvg(cfg, node_partitions, base_config)


__all__ = ["SeededFedAvg", "RoundFailedError", "build_strategy"]
