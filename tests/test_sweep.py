"""Sweeps: grid expansion, the report from finished / failed / missing runs, and one real tiny sweep
over every defense and both attack modes through the command line."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flip_fl.config import ConfigError, to_yaml
from flip_fl.experiments.grid import load_sweep
from flip_fl.experiments.report import write_report
from flip_fl.experiments.sweep import check_finished
from strategies import DEFENSES

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "seed": 0,
    "data": {"name": "synthetic", "synthetic": {"train_size": 800, "test_size": 200}},
    "model": {"name": "tiny_cnn"},
    "federation": {"num_clients": 8, "clients_per_round": 7, "num_rounds": 2},
    "training": {"batch_size": 32, "lr": 0.05, "local_epochs": 1},
    "attack": {"num_malicious": 1, "poison_fraction": 0.5},
    "defense": {"fltrust": {"root_size": 50}},
}
SINGLE_SHOT = {"attack.mode": ["single_shot"], "roles.malicious": ["clients.ModelReplacementClient"],
               "attack.scale": ["auto"]}


def sim(*args: str, cwd: Path = ROOT, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sim.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def write_spec(path: Path, grid, **extra) -> Path:
    path.write_text(yaml.safe_dump({"config": TINY, "grid": grid, **extra}, sort_keys=False))
    return path


def test_grid_union_names_labels_and_rows(tmp_path: Path):
    spec = write_spec(tmp_path / "s.yaml", [
        {**SINGLE_SHOT, "defense.name": ["fedavg", "krum"], "seed": [0, 1]},
        {"attack.mode": ["continuous"], "defense.name": ["fedavg", "krum"], "seed": [0, 1]},
        {"label": "tau", "attack.mode": ["continuous"], "defense.threshold": [0.3], "seed": [0]},
    ])
    sweep = load_sweep(spec, ["federation.num_rounds=3"])
    assert len(sweep.points) == 9 and all(p.cfg.federation.num_rounds == 3 for p in sweep.points)
    assert sweep.points[0].name == ("attack.mode=single_shot__roles.malicious=clients.ModelReplacementClient__"
                                    "attack.scale=auto__defense.name=fedavg__seed=0")
    assert sweep.row_keys == ["defense.name", "defense.threshold"]
    assert sweep.points[-1].label == "tau" and sweep.points[-1].cfg.defense.threshold == 0.3
    assert len({p.name for p in sweep.points}) == 9


@pytest.mark.parametrize("grid, message", [
    ({"defense.name": "krum"}, "grid.defense.name: expected a non-empty list"),
    ([], "grid: expected a mapping"),
    ({"defense.name": ["bulyan"], "federation.clients_per_round": [4]},
     "run defense.name=bulyan__federation.clients_per_round=4: defense.bulyan.num_malicious"),
    ({"defense.nme": ["krum"]}, "defense.nme: unknown key; did you mean 'name'"),
])
def test_bad_sweeps_are_config_errors(tmp_path: Path, grid, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_sweep(write_spec(tmp_path / "s.yaml", grid))


def fake_run(run_dir: Path, cfg, acc: float, asr: float, detection: bool = False) -> None:
    """A finished run directory as sim.py leaves it (the parts the report reads)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    rows = [{"round": r, "clean_acc": acc * r / 2, "asr": asr * r / 2, "clean_acc_thresholded": acc * r / 2,
             "asr_thresholded": asr * r / 2, "seconds": 1.0, "aggregation_seconds": 0.002 if r else None,
             **({"detection_tp": 1, "detection_fp": 1, "detection_fn": 0, "detection_tn": 5,
                 "defense_attacker_weight": 0.0} if detection and r else {})} for r in range(3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(json.dumps({"final": rows[-1], "max_asr": asr, "wall_seconds": 3.0}))


def test_report_counts_seeds_and_shows_failed_and_missing_runs(tmp_path: Path):
    sweep = load_sweep(write_spec(tmp_path / "s.yaml", {"attack.mode": ["continuous"], "defense.name":
                                                         ["fedavg", "krum", "median"], "seed": [0, 1]}))
    runs = tmp_path / "out" / "runs"
    points = {p.name: p for p in sweep.points}
    for name, p in points.items():
        if p.cfg.defense.name == "fedavg":
            fake_run(runs / name, p.cfg, acc=0.9 + 0.02 * p.cfg.seed, asr=0.5)
        elif p.cfg.defense.name == "krum" and p.cfg.seed == 0:
            fake_run(runs / name, p.cfg, acc=0.8, asr=0.1, detection=True)
        elif p.cfg.defense.name == "krum":
            (runs / name).mkdir(parents=True)
            (runs / name / "log.txt").write_text("round 1 ...\nerror: simulation failed: disk on fire\n")
    results = write_report(sweep, tmp_path / "out")
    assert [r["status"] for r in results] == ["ok", "ok", "ok", "failed", "not run", "not run"]
    with (tmp_path / "out" / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows[3]["error"] == "error: simulation failed: disk on fire" and rows[2]["detection_precision"] == "0.5"
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| fedavg | 91.00 ± 1.41 / 50.00 ± 0.00 |" in table
    assert "| krum | 80.00 / 10.00 (1 of 2 failed) |" in table and "| median | not run |" in table
    assert "| krum | synthetic / continuous | 0.50 | 1.00 | 0.00 |" in table
    assert "disk on fire" in table and (tmp_path / "out" / "plot_synthetic_continuous.png").stat().st_size > 0
    other = load_sweep(write_spec(tmp_path / "s2.yaml", {"attack.mode": ["continuous"], "defense.name": ["fedavg"],
                                                          "seed": [0], "federation.num_rounds": [3]}))
    other.points[0].name = sweep.points[0].name
    with pytest.raises(ConfigError, match="a finished run with a different config is in the way"):
        check_finished(other, tmp_path / "out")


@pytest.mark.e2e
def test_sweep_command_bad_input_exits_2_with_one_line(tmp_path: Path):
    result = sim("sweep", "--config", str(write_spec(tmp_path / "s.yaml", {"defense.name": ["nope"]})),
                 "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: run defense.name=nope: defense.name: unknown defense 'nope'; choose one of " +
        ", ".join(DEFENSES.names) + "; or a dotted path to your own class"]


@pytest.mark.e2e
def test_tiny_sweep_over_every_defense_and_both_attack_modes(tmp_path: Path):
    """5 real runs (2 rounds, 8 clients) as subprocesses, two at a time: both attack modes, each with the undefended
    run the cost table divides by, and a detecting defense. Every defense's rule runs through the strategy in
    tests/defenses/; this test is about the sweep machinery."""
    names = ["fedavg", "flame", "krum", "foolsgold"]
    spec = write_spec(tmp_path / "tiny.yaml", [
        {**SINGLE_SHOT, "defense.name": ["fedavg", "flame"]},
        {"attack.mode": ["continuous"], "defense.name": ["fedavg", "krum", "foolsgold"]},
    ], title="Tiny sweep")
    out = tmp_path / "sweep"
    result = sim("sweep", "--config", str(spec), "--output-dir", str(out), "--jobs", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows), rows
    assert {r["defense.name"] for r in rows} == set(names)
    table = (out / "results.md").read_text()
    for name in names:
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert re.search(r"\| \d+\.\d\d / \d+\.\d\d \|", line), line
    for plot in ("plot_synthetic_single_shot.png", "plot_synthetic_continuous.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 5 and all((r / "curves.png").is_file() for r in runs)
    krum_run = next(r["run"] for r in rows if r["defense.name"] == "krum")
    krum = json.loads((out / "runs" / krum_run / "metrics.jsonl").read_text().splitlines()[1])
    assert "detection_recall" in krum and len(krum["defense_kept"]) == 1
    assert "## Server cost per round" in table and "## Detection" in table
    start = time.time()
    again = sim("sweep", "--config", str(spec), "--output-dir", str(out))
    assert again.returncode == 0 and again.stdout.count("finished before, skipped") == 5
    assert time.time() - start < 60


def test_cost_ratios_are_filled_for_every_row_relative_to_the_undefended_run(tmp_path: Path):
    """The grid also varies roles.benign (FLIP rows): every row still gets its '× undefended' ratios."""
    sweep = load_sweep(write_spec(tmp_path / "s.yaml", {
        "attack.mode": ["continuous"], "defense.name": ["fedavg", "krum"],
        "roles.benign": ["clients.BenignClient", "clients.FlipDefenseClient"], "seed": [0]}))
    runs = tmp_path / "out" / "runs"
    for p in sweep.points:
        fake_run(runs / p.name, p.cfg, acc=0.9, asr=0.5)
        slower = (3.0 if p.cfg.defense.name == "krum" else 1.0) * (2.0 if "Flip" in p.cfg.roles.benign else 1.0)
        path = runs / p.name / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            row["seconds"] *= slower
            row["aggregation_seconds"] = row["aggregation_seconds"] and row["aggregation_seconds"] * slower
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(sweep, tmp_path / "out")
    table = (tmp_path / "out" / "results.md").read_text()
    cost = table.split("## Server cost per round")[1].split("##")[0]
    lines = [line for line in cost.splitlines() if line.startswith("| ") and not line.startswith("| Defense")]
    assert len(lines) == 4 and "—" not in cost and "no undefended run" not in cost
    ratios = {line.split(" | ")[0][2:]: (line.split(" | ")[3], line.split(" | ")[5].rstrip(" |")) for line in lines}
    assert ratios == {"fedavg, roles.benign=clients.BenignClient": ("1.0", "1.00"),
                      "krum, roles.benign=clients.BenignClient": ("3.0", "3.00"),
                      "fedavg, roles.benign=clients.FlipDefenseClient": ("2.0", "2.00"),
                      "krum, roles.benign=clients.FlipDefenseClient": ("6.0", "6.00")}


def test_sweep_clock_counts_runs_and_estimates_the_rest():
    from flip_fl.experiments.sweep import SweepClock

    clock = SweepClock(todo=3, jobs=2, done=2)  # 2 runs finished before, 3 to go, two at a time
    assert clock.finished(10.0) == "runs 3/5 done, eta 10s"  # 2 left x 10 s / 2 jobs
    assert clock.finished(30.0) == "runs 4/5 done, eta 10s"
    assert clock.finished(20.0) == "runs 5/5 done"
