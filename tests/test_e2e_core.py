"""Real simulations through Flower's Simulation Runtime and Ray on tiny synthetic data."""

import json
from pathlib import Path

import pytest

from flip_fl.config import ConfigError
from flip_fl.experiments.run import SimulationError, run
from tests.tiny import tiny_config

pytestmark = pytest.mark.e2e  # real Flower + Ray simulations / command-line subprocesses


def strip_timings(row: dict) -> dict:
    """A metrics row without its wall-clock measurements (every key ending in 'seconds', per client too)."""
    return {k: {p: strip_timings(m) for p, m in v.items()} if k == "client_metrics" else v
            for k, v in row.items() if not k.endswith("seconds")}


def test_poisoned_federation_learns_and_is_backdoored(tmp_path: Path):
    cfg = tiny_config("federation.num_rounds=6", "attack.num_malicious=2", "attack.poison_fraction=0.5")
    summary = run(cfg, tmp_path / "a", echo=False)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(7))
    assert all(set(r["malicious"]) == set(r["attacking"]) and len(r["malicious"]) == 2 for r in rows[1:])
    assert all(len(r["sampled"]) == 4 and r["failures"] == 0 for r in rows[1:])
    assert rows[-1]["clean_acc"] > 0.8 and rows[-1]["asr"] > 0.7 and rows[0]["asr"] < 0.3
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final_model.pt", "threshold_sweep.csv"):
        assert (tmp_path / "a" / name).is_file(), name
    assert summary["final"]["round"] == 6

    again = run(cfg, tmp_path / "b", echo=False)
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    differences = [(a["round"], {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)})
                   for a, b in zip(map(strip_timings, rows), map(strip_timings, rows_b))]
    assert all(not diff for _, diff in differences), differences
    assert again["final"]["clean_acc"] == summary["final"]["clean_acc"]


def test_unweighted_mean_with_server_lr_and_a_custom_client(tmp_path: Path, monkeypatch):
    """A user-written client class in its own module, importable from the working directory, runs in Ray."""
    module = tmp_path / "loud_clients.py"  # a module name no other test imports (modules stay cached)
    module.write_text(
        "from clients import BenignClient\n"
        "class LoudClient(BenignClient):\n"
        "    def fit(self, global_state, info):\n"
        "        result = super().fit(global_state, info)\n"
        "        result.metrics['loud'] = 42.0\n"
        "        return result\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_config("roles.benign=loud_clients.LoudClient", "server.weighted=false", "server.lr=0.5",
                      "federation.num_rounds=2")
    run(cfg, tmp_path / "out", echo=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["client_loud"] == 42.0 and rows[-1]["clean_acc"] > rows[0]["clean_acc"]


def test_failing_clients_are_counted_and_a_dead_round_aborts(tmp_path: Path, monkeypatch):
    module = tmp_path / "broken_clients.py"
    module.write_text(
        "from clients import BenignClient\n"
        "class FlakyClient(BenignClient):\n"
        "    def fit(self, global_state, info):\n"
        "        if self.partition_id % 2 == 1:\n"
        "            raise RuntimeError('disk on fire')\n"
        "        return super().fit(global_state, info)\n"
        "class DeadClient(BenignClient):\n"
        "    def fit(self, global_state, info):\n"
        "        raise RuntimeError('always broken')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    run(tiny_config("roles.benign=broken_clients.FlakyClient", "federation.num_rounds=2", "server.min_clients=1"),
        tmp_path / "f", echo=False)
    rows = [json.loads(line) for line in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        odd = [p for p in row["sampled"] if p % 2 == 1]
        assert row["failures"] == len(odd) and row["failed"] == odd
        assert odd and "disk on fire" in row["errors"][0]
    with pytest.raises(SimulationError, match="all 4 sampled clients failed.*always broken"):
        run(tiny_config("roles.benign=broken_clients.DeadClient"), tmp_path / "d", echo=False)
    assert (tmp_path / "d" / "metrics.jsonl").read_text().count("\n") == 1  # round 0 was kept


def test_a_hostile_client_through_flower_and_ray_is_a_counted_failure(tmp_path: Path):
    """The wiring, end to end: an attacker whose replies hold NaN, inf or miss a tensor (one per round) is
    a failed client with its reason in metrics.jsonl, the run finishes and the global model stays finite."""
    import torch

    cfg = tiny_config("attack.num_malicious=1", "roles.malicious=tests.hostile_clients.HostileClient",
                      "federation.num_rounds=3")
    summary = run(cfg, tmp_path / "h", echo=False)
    rows = [json.loads(line) for line in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    reasons = ["has 1 non-finite value", "has 1 non-finite value", "is missing"]
    for row, reason in zip(rows[1:], reasons):
        assert row["failures"] == 1 and row["failed"] == row["malicious"]
        assert len(row["errors"]) == 1 and reason in row["errors"][0] and str(row["malicious"][0]) in row["errors"][0]
    final = torch.load(tmp_path / "h" / "final_model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    assert summary["total_failures"] == 3 and rows[-1]["clean_acc"] > rows[0]["clean_acc"] + 0.2


def test_gpu_request_without_gpus_fails_fast(tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="resources.num_gpus: each client asks for 1 GPU"):
        run(tiny_config("resources.num_gpus=1"), tmp_path / "g", echo=False)
