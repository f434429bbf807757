"""One real run, piped as in CI, with a client that raises in every round: what the researcher sees and gets.

Shared by every assertion (a real Flower + Ray run through the command line costs half a minute).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.tiny import TINY

pytestmark = pytest.mark.e2e  # real Flower + Ray simulations / command-line subprocesses

ROOT = Path(__file__).resolve().parents[1]
BROKEN = ("from clients import BenignClient\n"
          "class OneBrokenClient(BenignClient):\n"
          "    def fit(self, global_state, info):\n"
          "        if self.partition_id == 1:\n"
          "            raise RuntimeError('disk on fire')\n"
          "        return super().fit(global_state, info)\n")


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`sim.py` with stdout and stderr piped: 4 clients, all sampled, partition 1 raising; TensorBoard on."""
    work = tmp_path_factory.mktemp("piped")
    (work / "broken_clients.py").write_text(BROKEN)
    cfg = json.loads(json.dumps(TINY))
    cfg["federation"] = {"num_clients": 4, "clients_per_round": 4, "num_rounds": 3}
    cfg["roles"] = {"benign": "broken_clients.OneBrokenClient"}
    cfg["attack"] = {"num_malicious": 1, "malicious_ids": [2], "poison_fraction": 0.5}
    cfg["results"] = {"tensorboard": True}
    cfg["server"] = {"validation_size": 100}
    (work / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(work)}  # the user's client module, as a user would make it importable
    result = subprocess.run([sys.executable, str(ROOT / "sim.py"), "--config", "run.yaml", "--output-dir", "out"],
                            cwd=work, capture_output=True, text=True, timeout=300, env=env)
    return result, work / "out"


def test_piped_output_is_one_plain_line_per_phase_and_round(piped_run):
    result, out = piped_run
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if not line.startswith("  ")]  # minus slow-round replies
    rounds = [line for line in lines if line.startswith("round ")]
    assert [int(line.split("|")[0].split()[1]) for line in rounds] == [0, 1, 2, 3]
    assert all("FAILURES 1" in line for line in rounds[1:])
    phases = [line for line in lines if line.startswith("[")]
    assert [p.split("] ", 1)[1].split(" ")[0] for p in phases] == ["loading", "starting", "connecting", "final"]
    assert lines[-1].startswith("done: 3 rounds") and len(lines) == len(rounds) + len(phases) + 1
    assert "\x1b[" not in result.stdout  # no terminal control codes in a file


def test_a_client_failing_every_round_gives_one_summary_line_per_round_and_errors_log(piped_run):
    result, out = piped_run
    log = out / "errors.log"
    assert result.stderr.splitlines() == [
        f"round {r}: 1 of 4 clients failed: 1x RuntimeError: disk on fire (partition 1); traceback in out/errors.log"
        for r in (1, 2, 3)]
    text = log.read_text()
    assert text.count("=== round") == 1 and text.startswith("=== round 1, partitions [1]: RuntimeError: disk on fire")
    assert "raise RuntimeError('disk on fire')" in text and "broken_clients.py" in text


def test_csv_tables_and_tensorboard_agree_with_metrics_jsonl(piped_run):
    _, out = piped_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    table = pd.read_csv(out / "metrics.csv")
    assert table["round"].tolist() == [0, 1, 2, 3] and table["failures"].tolist() == [0, 1, 1, 1]
    assert table["clean_acc"].tolist() == [r["clean_acc"] for r in rows]
    assert table["attack_round"].tolist() == [False, True, True, True] and table["failed"].tolist()[1:] == [1, 1, 1]
    clients = pd.read_csv(out / "client_metrics.csv")
    assert len(clients) == 12 and clients.groupby("round")["partition"].apply(list).tolist() == [[0, 1, 2, 3]] * 3
    assert clients.loc[clients["failed"], "partition"].tolist() == [1, 1, 1]
    assert clients.loc[clients["malicious"], "partition"].tolist() == [2, 2, 2]
    ok = clients[~clients["failed"]]
    assert ok["train_seconds"].notna().all() and clients.loc[clients["failed"], "train_seconds"].isna().all()
    (event_file,) = (out / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("clean_acc")] == [
        (r["round"], pytest.approx(r["clean_acc"])) for r in rows]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    sweep = pd.read_csv(out / "threshold_sweep.csv")
    assert sweep["split"].value_counts().to_dict() == {"test": 20, "validation": 20}
