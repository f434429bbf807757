"""Honest local training."""

from __future__ import annotations

from flip_fl.federation.client import BaseClient, FitResult, RoundInfo, StateDict
from flip_fl.training import sgd, state_on_cpu, train_epochs


class BenignClient(BaseClient):
    """Local SGD on the client's own data with the `client.*` settings."""

    def fit(self, global_state: StateDict, info: RoundInfo) -> FitResult:
        c = self.cfg.client
        model = self.model_from(global_state)
        optimizer = sgd(model, c.lr, c.momentum, c.weight_decay)
        metrics = train_epochs(model, self.data, optimizer, epochs=c.local_epochs, batch_size=c.batch_size,
                               device=self.device, generator=self.generator(info.server_round),
                               max_batches=c.max_batches)
        return FitResult(state_on_cpu(model), len(self.data), metrics)
