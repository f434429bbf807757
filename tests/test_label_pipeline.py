"""FLIP label pipeline stages (resumable, file outputs, CLI) and the label-only FL client."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.flip_labels import FlipLabelClient
from flip_fl.config import ConfigError, load_config
from flip_fl.data import client_dataset, client_indices, load_datasets
from flip_fl.experiments.labels_pipeline import run_stages
from flip_fl.federation.client import ClientState, RoundInfo
from flip_fl.models import build_model
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("data.synthetic.train_size=300", "data.synthetic.test_size=100", "data.synthetic.image_size=16",
         "attack.trigger=sinusoidal", "attack.trigger_args={amplitude: 0.1, frequency: 4}",
         "flip_labels.expert_epochs=2", "flip_labels.batch_size=64", "flip_labels.checkpoint_every=3",
         "flip_labels.augment=false", "flip_labels.passes=1", "flip_labels.budgets=[10, 0.1]",
         "flip_labels.user_epochs=1", "flip_labels.random_baseline=true")


def test_stages_write_outputs_and_resume(tmp_path: Path):
    cfg = tiny_config(*SMALL)
    train, test = load_datasets(cfg)
    lines: list[str] = []
    timings = run_stages(cfg, train, test, tmp_path, ["experts", "labels", "flips", "user"], log=lines.append)
    assert set(timings) == {"experts", "labels", "flips", "user"}
    steps = sorted(tmp_path.glob("experts/expert_0/step_*.pt"))
    # 300 clean + 30 triggered copies, batch 64 -> 6 steps per epoch, 2 epochs -> steps 0,3,...,12
    assert [int(p.stem.split("_")[1]) for p in steps] == [0, 3, 6, 9, 12]
    logits = torch.load(tmp_path / "labels" / "logits_0.pt", weights_only=True)
    assert logits.shape == (300, 10)
    y = train.labels.numpy()
    for name, count in (("10", 10), ("0.1", 30)):
        labels = np.load(tmp_path / "flips" / f"labels_{name}.npy")
        indices = np.load(tmp_path / "flips" / f"indices_{name}.npy")
        assert len(indices) == count and (labels != y).sum() == count
        assert np.array_equal(np.flatnonzero(labels != y), np.sort(indices))
    table = (tmp_path / "user" / "results.md").read_text()
    assert table.count("\n") == 2 + 1 + 2 * 3 and "| clean |" in table and "| random |" in table
    assert "| random-same-class |" in table and "PTA without trigger" in table
    expert_scores = json.loads((tmp_path / "experts" / "expert_0" / "done.json").read_text())["test"]
    assert set(expert_scores) == {"cta", "pta", "pta_clean"}
    assert any(line.startswith("experts: expert 1: CTA") for line in lines)

    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.pt")}
    run_stages(cfg, train, test, tmp_path, ["experts", "labels"], log=lines.append)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.pt")} == before  # reused, not recomputed


@pytest.mark.e2e
def test_cli_reports_a_missing_earlier_stage(tmp_path: Path):
    result = subprocess.run([sys.executable, str(ROOT / "sim.py"), "labels", "--config",
                             "configs/flip_labels_synthetic.yaml", "--stage", "flips", "--output-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --stage flips: ") and "run --stage labels first" in lines[0]


def test_label_file_is_sliced_to_the_partition(tmp_path: Path):
    cfg = tiny_config(*SMALL)
    train, _ = load_datasets(cfg)
    poisoned = (train.labels.numpy() + 1) % 10
    path = tmp_path / "labels.npy"
    np.save(path, poisoned)
    cfg = tiny_config(*SMALL, f"flip_labels.label_file={path}", "roles.malicious=clients.FlipLabelClient",
                      "attack.num_malicious=1")
    FlipLabelClient.check_config(cfg)
    client = FlipLabelClient(cfg, 3, client_dataset(cfg, 3), torch.device("cpu"), ClientState(), tmp_path / "w")
    assert np.array_equal(client.flip_labels(), poisoned[client_indices(cfg, 3)])
    model = build_model(cfg.model, train)
    result = client.fit(model.state_dict(), RoundInfo(1, malicious=True, attacking=True, attacker_index=0))
    assert result.metrics["flipped_labels"] == len(client_indices(cfg, 3))

    np.save(path, poisoned[:10])
    with pytest.raises(ConfigError, match="flip_labels.label_file: .* expected 300 integer labels"):
        FlipLabelClient.check_config(cfg)
    with pytest.raises(ConfigError, match="flip_labels.label_file: file not found"):
        FlipLabelClient.check_config(tiny_config(*SMALL, "flip_labels.label_file=/nonexistent.npy"))


def test_attacker_computes_and_caches_its_own_labels(tmp_path: Path):
    cfg = tiny_config(*SMALL, "flip_labels.client_budget=0.2", "roles.malicious=clients.FlipLabelClient",
                      "attack.num_malicious=1")
    data = client_dataset(cfg, 0)
    client = FlipLabelClient(cfg, 0, data, torch.device("cpu"), ClientState(), tmp_path / "w")
    labels = client.flip_labels()
    assert (labels != data.labels.numpy()).sum() == round(0.2 * len(data))
    assert (tmp_path / "w" / "flip_labels.npy").is_file()
    again = FlipLabelClient(cfg, 0, data, torch.device("cpu"), ClientState(), tmp_path / "w")
    assert np.array_equal(again.flip_labels(), labels)


def test_flips_concentrate_on_the_source_class_and_report_the_controls(tmp_path: Path):
    """configs/flip_labels_synthetic.yaml at budgets 1% and 5%. Matching puts the flips on source-class
    images, so PTA grows with the budget and beats the same number of random flips to the target.
    The same-class control and PTA without the trigger are reported next to it: on this synthetic
    data they show that the PTA is class confusion rather than a backdoor (docs/LABELS.md)."""
    cfg = load_config(ROOT / "configs" / "flip_labels_synthetic.yaml", ["flip_labels.budgets=[30, 150]"])
    train, test = load_datasets(cfg)
    run_stages(cfg, train, test, tmp_path, ["experts", "labels", "flips", "user"], log=lambda line: None)
    with (tmp_path / "user" / "results.csv").open() as fh:
        rows = {(int(r["budget"]), r["labels"]): r for r in csv.DictReader(fh)}
    pta = {key: float(r["pta"]) for key, r in rows.items()}
    assert pta[(150, "flip")] > pta[(30, "flip")] + 0.2
    assert pta[(150, "flip")] >= 0.4 and pta[(150, "flip")] >= pta[(150, "random")] + 0.3
    flipped = np.load(tmp_path / "flips" / "indices_150.npy")
    assert (train.labels.numpy()[flipped] == cfg.attack.source_label).mean() > 0.9  # images of the source class
    assert rows[(150, "random-same-class")]["flips"] == "150"
    assert float(rows[(150, "flip")]["pta_clean"]) > float(rows[(0, "clean")]["pta_clean"]) + 0.2


def test_soft_labels_are_one_label_set_whatever_the_budgets(tmp_path: Path):
    """With flip_labels.soft every user model would train on the same soft labels: one row, not one per budget."""
    cfg = tiny_config(*SMALL, "flip_labels.soft=true", "flip_labels.alpha=0.2")
    train, test = load_datasets(cfg)
    lines: list[str] = []
    rows = run_stages(cfg, train, test, tmp_path, ["experts", "labels", "flips", "user"], log=lines.append)
    assert set(rows) == {"experts", "labels", "flips", "user"}
    with (tmp_path / "user" / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [(r["budget"], r["labels"]) for r in table] == [
        ("0", "clean"), ("soft", "flip-soft alpha=0.2"), ("soft", "random"), ("soft", "random-same-class")]
    logits = torch.load(tmp_path / "labels" / "logits_0.pt", weights_only=True)
    soft = torch.softmax(0.2 * torch.nn.functional.one_hot(train.labels, 10) + 0.8 * logits, dim=1)
    changed = int((soft.argmax(dim=1) != train.labels).sum())
    assert all(int(r["flips"]) == changed for r in table[1:])
    assert sum("flip-soft alpha=0.2 labels, budget soft" in line for line in lines) == 1
