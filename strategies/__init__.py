"""Server strategies: `SeededFedAvg`, the public `Defense` base, and one module per defense.

- `seeded_fedavg`: FedAvg with seeded sampling, attacker roles, failure accounting and a server lr;
- `defense`: `Defense` (one `rule` hook on the round's update matrix), `Decision`, `RoundUpdates`;
- one module per defense, each registering its class in `flip_fl.registry.DEFENSES` under its
  `defense.name` (`fedavg`, `krum`, `multikrum`, `bulyan`, `median`, ...): found by the registry, listed nowhere;
- `factory`: `build_strategy`, the config -> `cls(**federation options, **cls.options(params, cfg))`.

The aggregation math of the defenses is numpy functions in `flip_fl.defenses`, or in the defense's own
module for a rule no other code uses.
"""

from __future__ import annotations

from flip_fl.registry import DEFENSES
from strategies.defense import Decision, Defense, RoundUpdates
from strategies.factory import build_strategy, evaluation_set
from strategies.seeded_fedavg import RoundFailedError, SeededFedAvg

__all__ = ["DEFENSES", "Decision", "Defense", "RoundFailedError", "RoundUpdates", "SeededFedAvg", "build_strategy",
           "evaluation_set"]
