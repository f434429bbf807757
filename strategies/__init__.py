"""Server strategies: SeededFedAvg and the defenses built on it, selected by `defense.name`."""

from __future__ import annotations

from flip_fl.config import Config
from strategies.defense import Decision, DefenseStrategy
from strategies.flower_builtin import BulyanDefense, KrumDefense, MedianDefense, MultiKrumDefense, TrimmedMeanDefense
from strategies.robust import (FLAMEDefense, FLTrustDefense, FoolsGoldDefense, NormClipDefense, RFADefense, RLRDefense,
                               WeakDPDefense, evaluation_set)
from strategies.seeded_fedavg import RoundFailedError, SeededFedAvg

DEFENSES: dict[str, type[DefenseStrategy]] = {cls.name: cls for cls in (
    DefenseStrategy, KrumDefense, MultiKrumDefense, BulyanDefense, MedianDefense, TrimmedMeanDefense,
    NormClipDefense, WeakDPDefense, RFADefense, FoolsGoldDefense, RLRDefense, FLTrustDefense, FLAMEDefense)}


def build_strategy(cfg: Config, node_partitions: dict[int, int], base_config: dict[str, str]) -> SeededFedAvg:
    """The strategy `defense.name` asks for, wired to the run's node -> partition map."""
    return DEFENSES[cfg.defense.name](cfg, node_partitions, base_config)


__all__ = ["DEFENSES", "Decision", "DefenseStrategy", "SeededFedAvg", "RoundFailedError", "build_strategy",
           "evaluation_set"]
