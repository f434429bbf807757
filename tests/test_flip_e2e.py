"""FLIP end to end: real Flower + Ray runs of configs/synthetic_flip.yaml, FLIP against no defense.

The clean starting checkpoint is trained centrally here (seconds) instead of by a federated step (1)
of the config. Runs are seeded and repeat exactly. The bounds are the FLIP issue's: thresholded ASR at
most a third of the undefended ASR, clean accuracy at most 5 points lower (docs/FLIP.md, "Measured").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flip_fl.config import load_config
from flip_fl.data import load_datasets
from flip_fl.models import build_model
from flip_fl.simulation import run
from flip_fl.training import sgd, train_epochs

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic_flip.yaml"
NO_DEFENSE = ("clients.benign=clients.BenignClient",)


@pytest.fixture(scope="module")
def simulate(tmp_path_factory):
    """Run the synthetic FLIP config from a centrally trained clean model; returns the metrics rows."""
    root = tmp_path_factory.mktemp("flip_e2e")
    cfg = load_config(CONFIG, ["server.initial_model=null"])
    train, _ = load_datasets(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, train)
    train_epochs(model, train, sgd(model, 0.05, 0.9, 5e-4), epochs=6, batch_size=32, device=torch.device("cpu"),
                 generator=torch.Generator().manual_seed(0))
    torch.save(model.state_dict(), root / "clean.pt")

    def _run(name: str, *overrides: str) -> list[dict]:
        cfg = load_config(CONFIG, [f"server.initial_model={root / 'clean.pt'}", *overrides])
        run(cfg, root / name, echo=False)
        return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]

    return _run


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def test_continuous_attack_flip_cuts_asr_to_a_third_at_close_accuracy(simulate):
    none = simulate("none_continuous", *NO_DEFENSE)
    flip = simulate("flip_continuous")
    late_none, late_flip = none[-3:], flip[-3:]
    assert mean(late_none, "asr") > 0.3  # the attack works without a defense
    assert mean(late_flip, "asr_thresholded") <= mean(late_none, "asr") / 3
    assert mean(late_flip, "clean_acc_thresholded") >= mean(late_none, "clean_acc") - 0.05
    for row in flip[1:]:
        assert row["client_invert_seconds"] > 0 and row["client_harden_seconds"] > 0
        assert row["client_flip_images_stamped"] > 0
        benign = [m for p, m in row["client_metrics"].items() if int(p) not in row["malicious"]]
        assert benign and all(m["train_seconds"] >= m["invert_seconds"] for m in benign)
    assert "client_invert_seconds" not in none[-1]

