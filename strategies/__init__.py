"""Server strategies: SeededFedAvg and the defenses built on it, selected by `defense.name`.

- `seeded_fedavg`: FedAvg with seeded sampling, attacker roles, failure accounting and a server lr;
- `defense`: the base of every defense (timing, update matrices, detection metrics);
- `selection`: Krum, Multi-Krum, Bulyan; `coordinate`: median, trimmed mean;
- `clipping`: norm clipping, weak DP, FLAME; `reweighting`: RFA, FoolsGold, RLR, FLTrust.

The aggregation rules themselves are numpy functions in `flip_fl.defenses`.
"""

from __future__ import annotations

from flip_fl.config import Config
from strategies.clipping import FLAMEDefense, NormClipDefense, WeakDPDefense
from strategies.coordinate import MedianDefense, TrimmedMeanDefense
from strategies.defense import Decision, DefenseStrategy
from strategies.reweighting import FLTrustDefense, FoolsGoldDefense, RFADefense, RLRDefense
from strategies.seeded_fedavg import RoundFailedError, SeededFedAvg
from strategies.selection import BulyanDefense, KrumDefense, MultiKrumDefense

DEFENSES: dict[str, type[DefenseStrategy]] = {cls.name: cls for cls in (
    DefenseStrategy, KrumDefense, MultiKrumDefense, BulyanDefense, MedianDefense, TrimmedMeanDefense,
    NormClipDefense, WeakDPDefense, RFADefense, FoolsGoldDefense, RLRDefense, FLTrustDefense, FLAMEDefense)}


def build_strategy(cfg: Config, node_partitions: dict[int, int], base_config: dict[str, str]) -> SeededFedAvg:
    """The strategy `defense.name` asks for, wired to the run's node -> partition map."""
    return DEFENSES[cfg.defense.name](cfg, node_partitions, base_config)


__all__ = ["DEFENSES", "Decision", "DefenseStrategy", "SeededFedAvg", "RoundFailedError", "build_strategy"]
