"""Server strategies: SeededFedAvg and the defenses built on it, selected by `defense.name`.

- `seeded_fedavg`: FedAvg with seeded sampling, attacker roles, failure accounting and a server lr;
- `defense`: the base of every defense (timing, update matrices, detection metrics);
- `selection`: Krum, Multi-Krum, Bulyan; `coordinate`: median, trimmed mean (Flower's rules);
- `clipping`: norm clipping, weak DP, FLAME; `reweighting`: RFA, FoolsGold, RLR, FLTrust;
- `factory`: `build_strategy`, the one place where the config becomes constructor arguments.

Strategies take explicit keyword arguments (as Flower's do) and register in `flip_fl.registry.DEFENSES`;
the aggregation rules themselves are numpy functions in `flip_fl.defenses`.
"""

from __future__ import annotations

from flip_fl.registry import DEFENSES
from strategies.clipping import FLAMEDefense, NormClipDefense, WeakDPDefense
from strategies.coordinate import MedianDefense, TrimmedMeanDefense
from strategies.defense import Decision, DefenseStrategy, DeltaDefense
from strategies.factory import build_strategy
from strategies.reweighting import FLTrustDefense, FoolsGoldDefense, RFADefense, RLRDefense
from strategies.seeded_fedavg import RoundFailedError, SeededFedAvg
from strategies.selection import BulyanDefense, KrumDefense, MultiKrumDefense

__all__ = ["DEFENSES", "BulyanDefense", "Decision", "DefenseStrategy", "DeltaDefense", "FLAMEDefense",
           "FLTrustDefense", "FoolsGoldDefense", "KrumDefense", "MedianDefense", "MultiKrumDefense",
           "NormClipDefense", "RFADefense", "RLRDefense", "RoundFailedError", "SeededFedAvg", "TrimmedMeanDefense",
           "WeakDPDefense", "build_strategy"]
