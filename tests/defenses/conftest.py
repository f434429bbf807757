"""Fixtures of the defense tests (the round harness itself is `tests/defenses/rounds.py`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from strategies import Defense
from tests.defenses.rounds import P


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Defense]:
    """`offline(strategy, g0=None)`: a defense that trains on the server (FLTrust's `server_update`) returns the
    fixed server update `g0` (default: ones on the trained parameters) instead; other defenses are unchanged."""

    def patch(strat: Defense, g0: np.ndarray | None = None) -> Defense:
        if hasattr(strat, "server_update"):
            value = np.ones(int(P.sum())) if g0 is None else g0
            monkeypatch.setattr(strat, "server_update", lambda server_round: value)
        return strat

    return patch
