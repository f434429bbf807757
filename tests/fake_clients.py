"""Cheap client classes for tests of the server loop (`tests.fake_clients.CountingClient` by dotted path)."""

from __future__ import annotations

import numpy as np
import torch

from flip_fl.federation.client import BaseClient, FitResult, RoundInfo, StateDict


class CountingClient(BaseClient):
    """No training: a seeded random step from the global model, scaled by how often this client has fitted.

    Its count and the rounds it took part in live in its `ClientState`, so a resume that lost them would
    send other updates and report other `fits` metrics.
    """

    def fit(self, global_state: StateDict, info: RoundInfo) -> FitResult:
        fits = int(self.state.values.get("fits", 0)) + 1
        self.state.values["fits"] = fits
        seen = self.state.arrays.get("rounds", np.zeros(0, dtype=np.int64))
        self.state.arrays["rounds"] = np.append(seen, info.server_round)[-8:]
        gen = self.generator(info.server_round)
        local = {k: v + 0.01 * fits * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in global_state.items()}
        return FitResult(local, num_examples=10 + self.partition_id, metrics={"fits": float(fits)})
