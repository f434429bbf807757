"""The attacks end to end through Flower and Ray on tiny synthetic data (about four simulations).

One clean run is shared: it is the no-attacker baseline of the continuous attack and the converged
model that the single-shot and norm-bounded attackers start from (the two-step recipe).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from flip_fl.attacks.poisoning import update_norm
from flip_fl.experiments.run import run
from tests.tiny import tiny_config

pytestmark = pytest.mark.e2e  # real Flower + Ray simulations / command-line subprocesses

BASE = {
    "seed": 0,
    "data": {"name": "synthetic", "synthetic": {"train_size": 2400, "test_size": 1000}},
    "model": {"name": "tiny_cnn"},
    "federation": {"num_clients": 8, "clients_per_round": 5, "num_rounds": 10},
    "training": {"batch_size": 32, "lr": 0.05, "local_epochs": 2},
    "server": {"lr": 1.0, "weighted": False},
    "attack": {"trigger": "pixel_pattern", "target_label": 2, "poison_fraction": 0.3125, "local_epochs": 4},
}



def simulate(out: Path, *overrides: str) -> list[dict[str, Any]]:
    run(tiny_config(*overrides, base=BASE), out, echo=False)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def column(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in rows]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[list[dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("clean")
    return simulate(out), out / "final_model.pt"


def test_clean_run_converges_without_a_backdoor(clean):
    rows, _ = clean
    assert rows[-1]["clean_acc"] > 0.95
    assert max(column(rows[3:], "asr")) < 0.05 and not any(r.get("attack_round") for r in rows)


def test_continuous_poisoning_backdoors_without_hurting_clean_accuracy(clean, tmp_path):
    rows = simulate(tmp_path / "continuous", "attack.num_malicious=2")
    baseline, _ = clean
    assert all(r["attack_round"] and r["attacking"] == r["malicious"] and len(r["attacking"]) == 2 for r in rows[1:])
    assert rows[-1]["asr"] >= 0.9 and min(column(rows[-3:], "asr")) >= 0.9
    assert abs(rows[-1]["clean_acc"] - baseline[-1]["clean_acc"]) <= 0.03
    last = [sum(column(r[-3:], "clean_acc")) / 3 for r in (rows, baseline)]
    assert abs(last[0] - last[1]) <= 0.03


def test_single_shot_model_replacement_jumps_then_decays(clean, tmp_path):
    _, checkpoint = clean
    rows = simulate(tmp_path / "single_shot", f"server.initial_model={checkpoint}", "federation.num_rounds=8",
                    "roles.malicious=clients.ModelReplacementClient", "attack.scale=auto",
                    "attack.mode=single_shot", "attack.start_round=2", "attack.malicious_ids=[0]")
    assert [r["round"] for r in rows if r.get("attack_round")] == [2]
    assert rows[2]["attacking"] == [0] and all(0 not in r["sampled"] for r in rows[1:] if r["round"] != 2)
    asr = column(rows, "asr")
    assert rows[0]["clean_acc"] > 0.95 and asr[0] < 0.1 and asr[1] < 0.1
    assert asr[2] >= 0.8
    assert sum(asr[6:9]) / 3 < sum(asr[3:6]) / 3 and asr[-1] < asr[2] - 0.3
    assert rows[-1]["clean_acc"] > 0.93


def test_norm_bounded_attacker_stays_inside_the_ball(clean, tmp_path):
    """One client per round, the attacker: each round's client metric is its own report."""
    _, checkpoint = clean
    eps = 0.5
    out = tmp_path / "norm_bounded"
    rows = simulate(out, f"server.initial_model={checkpoint}", "federation.num_rounds=3",
                    "federation.clients_per_round=1", "roles.malicious=clients.NormBoundedClient",
                    f"attack.norm_bound={eps}", "attack.project_every=5", "attack.malicious_ids=[0]")
    for r in rows[1:]:
        assert r["sampled"] == r["attacking"] == [0]
        assert 0.9 * eps <= r["client_update_norm"] <= eps  # the bound holds and binds
    start = torch.load(checkpoint, weights_only=True)
    final = torch.load(out / "final_model.pt", weights_only=True)
    assert update_norm(start, final) <= 3 * eps
    assert rows[-1]["asr"] > rows[0]["asr"] + 0.3
