"""Fixtures of the defense tests (the round harness itself is `tests/defenses/rounds.py`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from strategies import SeededFedAvg
from tests.defenses.rounds import P


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Callable[..., SeededFedAvg]:
    """`offline(strategy, g0=None)`: a defense that trains on the server (FLTrust's `server_update`) returns the
    fixed server update `g0` (default: ones on the trained parameters) instead; one that runs the local models
    on the server (FLARE's `representations`; the harness's global state is no runnable model) gets four
    points per client, k * (its trained-parameter update) for k = 1..4; other defenses are unchanged."""

    def patch(strat: SeededFedAvg, g0: np.ndarray | None = None) -> SeededFedAvg:
        if hasattr(strat, "server_update"):
            value = np.ones(int(P.sum())) if g0 is None else g0
            monkeypatch.setattr(strat, "server_update", lambda server_round: value)
        if hasattr(strat, "representations"):
            monkeypatch.setattr(strat, "representations", lambda U: [np.outer(np.arange(1.0, 5.0), u[P]) for u in U])
        return strat

    return patch
