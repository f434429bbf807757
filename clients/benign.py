"""Honest local training."""

from __future__ import annotations

from flip_fl.federation.client import BaseClient, FitResult, RoundInfo, StateDict
from flip_fl.training import LocalTraining, state_on_cpu


class BenignClient(BaseClient):
    """Local SGD on the client's own data with the `training.*` settings."""

    def fit(self, global_state: StateDict, info: RoundInfo) -> FitResult:
        """Train the global model on the local data."""
        model = self.model_from(global_state)
        metrics = LocalTraining.from_config(self.cfg.training).run(model, self.data, self.device,
                                                                 self.generator(info.server_round))
        return FitResult(state_on_cpu(model), len(self.data), metrics)
