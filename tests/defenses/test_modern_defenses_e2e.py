"""The defenses added in 0.2 (issue 22) through Flower + Ray: one tiny sweep, two runs at a time.

Each run is 2 rounds of 8 clients with one continuous pixel-pattern attacker. The rules themselves are tested
in-process in this folder; this test shows each one survives the real runtime: its run finishes, every round
records its decision, the model stays finite and the detecting ones report detection.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from strategies import DEFENSES
from tests.test_sweep import TINY, sim

MODERN = ["centered_clip", "dnc", "signguard", "freqfed", "alignins", "flare", "deepsight", "fldetector"]
DETECTING = {"dnc", "signguard", "freqfed", "alignins", "deepsight", "fldetector"}
"""The ones that decide per client (`defense_kept`)."""


@pytest.mark.e2e
def test_every_modern_defense_runs_through_flower_and_ray(tmp_path: Path):
    assert set(MODERN) <= set(DEFENSES.names)
    names = MODERN
    # 200 test images in all; DeepSight on 2,000 random inputs a seed instead of 20,000 (CI time)
    config = {**TINY, "defense": {**TINY["defense"], "flare": {"root_size": 50}, "deepsight": {"num_samples": 2000}}}
    spec = tmp_path / "modern.yaml"
    spec.write_text(yaml.safe_dump({"title": "Modern defenses, tiny", "config": config,
                                    "grid": {"attack.mode": ["continuous"], "defense.name": names}}))
    out = tmp_path / "sweep"
    result = sim("sweep", "--config", str(spec), "--output-dir", str(out), "--jobs", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with (out / "results.csv").open() as fh:
        rows = {r["defense.name"]: r for r in csv.DictReader(fh)}
    assert set(rows) == set(names) and all(r["status"] == "ok" for r in rows.values()), rows
    for name, row in rows.items():
        lines = [json.loads(line) for line in (out / "runs" / row["run"] / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in lines] == [0, 1, 2], name
        for r in lines[1:]:
            assert r["failures"] == 0 and math.isfinite(r["clean_loss"]), (name, r)
            assert "defense_clients" in r and len(r["defense_clients"]) == 7, (name, r)
            if name in DETECTING and not r.get("defense_skipped"):
                assert "detection_recall" in r and "defense_kept" in r, (name, r)
