"""Client classes that break their replies on purpose, for tests (`--set roles.malicious=tests.hostile_clients...`)."""

from __future__ import annotations

from clients import BenignClient
from flip_fl.federation.client import FitResult, RoundInfo, StateDict


class HostileClient(BenignClient):
    """Trains honestly, then breaks its reply, a different way each round.

    Round 1 (mod 3): NaN in the first float tensor; round 2: +inf in it; round 3: that tensor left out.
    """

    def fit(self, global_state: StateDict, info: RoundInfo) -> FitResult:
        """The honest result with one entry broken."""
        result = super().fit(global_state, info)
        state = dict(result.state)
        name = next(k for k, v in state.items() if v.is_floating_point())
        kind = info.server_round % 3
        if kind == 0:
            del state[name]
        else:
            broken = state[name].clone()
            broken.view(-1)[0] = float("nan") if kind == 1 else float("inf")
            state[name] = broken
        return FitResult(state, result.num_examples, result.metrics)

