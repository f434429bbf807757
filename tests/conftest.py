"""Shared fixtures: a tiny synthetic config and a runner for real Flower + Ray simulations."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flip_fl.federation.runtime import quiet_environment
from tests.tiny import tiny_config

quiet_environment()  # before any test module imports flwr, which reads its telemetry switch on import

# The slowest modules, slowest first: with two pytest-xdist workers and whole files per worker
# (`-n 2 --dist loadfile` in pyproject.toml) the longest file starts at once and the rest runs beside it.
SLOW_FIRST = ("test_lifecycle_e2e.py", "test_flip_e2e.py", "test_sweep.py", "test_modern_defenses_e2e.py",
              "test_attacks_e2e.py", "test_e2e_core.py", "test_run_outputs_e2e.py", "test_user_plugins.py",
              "test_scale.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the slow modules first (stable: the order within a module is kept)."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread():
    """One intra-op thread in the test process: tiny models run faster without thread contention."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def run_sim(tmp_path: Path) -> Callable[..., tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Run a real simulation through Flower and Ray; returns (summary, metrics rows)."""
    from flip_fl.experiments.run import run

    def _run(*overrides: str, name: str = "run", base: dict[str, Any] | None = None):
        out = tmp_path / name
        summary = run(tiny_config(*overrides, base=base), out, echo=False)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return summary, rows

    return _run
