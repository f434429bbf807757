"""The server loop without Ray (tests/inprocess.py): checkpoints, resume, stops, stuck clients, node count.

Each test runs the real `prepare` / `execute` of flip_fl.experiments.run (records, checkpoints, final
files); only the transport is in-process.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from flip_fl.config import Config, ConfigError
from flip_fl.experiments.run import execute, prepare
from flip_fl.federation.checkpoint import load_checkpoint, save_checkpoint
from flip_fl.federation.loop import RunInterrupted
from tests.inprocess import LocalGrid
from tests.tiny import tiny_config

STATEFUL = ("roles.benign=tests.fake_clients.CountingClient", "defense.name=foolsgold",
            "data.synthetic.test_size=50", "federation.num_rounds=6", "federation.clients_per_round=3")


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields."""
    def strip(row: dict) -> dict:
        return {k: {p: strip(m) for p, m in v.items()} if k == "client_metrics" else v
                for k, v in row.items() if not k.endswith("seconds")}
    return [strip(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def train_round(msg) -> int | None:
    """The server round of a TRAIN message (None for the start-up QUERY)."""
    records = msg.content.config_records
    return int(records["config"]["server-round"]) if "config" in records else None


def stop_when(stop: threading.Event, server_round: int):
    """An on_push hook that requests a stop while `server_round`'s TRAIN messages are out."""
    def hook(messages):
        if messages and train_round(messages[0]) == server_round:
            stop.set()
    return hook


def play(cfg: Config, out: Path, grid: LocalGrid | None = None, **kwargs) -> dict:
    prepared = prepare(cfg, out, **kwargs)
    return execute(grid or LocalGrid(cfg.federation.num_clients), prepared)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 6-round run with stateful clients and FoolsGold."""
    out = tmp_path_factory.mktemp("loop") / "reference"
    play(tiny_config(*STATEFUL), out)
    return out


@pytest.mark.parametrize("every, stop_round", [(1, 4), (4, 3)])
def test_stop_then_resume_gives_the_uninterrupted_run(reference, tmp_path, every, stop_round):
    cfg = tiny_config(*STATEFUL, f"checkpoint.every={every}")
    out = tmp_path / "run"
    stop = threading.Event()  # requested while round `stop_round` is out; its clients never answer (mid-round)
    grid = LocalGrid(6, on_push=stop_when(stop, stop_round), silent=lambda msg, pid: stop.is_set())
    with pytest.raises(RunInterrupted) as stopped:
        play(cfg, out, grid, stop=stop)
    assert stopped.value.server_round == stop_round - 1
    state, _ = load_checkpoint(out)
    assert state.server_round == stop_round - 1  # the stop saved the last finished round, whatever `every` says
    assert [r["round"] for r in rows(out)] == list(range(stop_round))
    assert state.strategy and all(k.startswith("history/") for k in state.strategy)  # FoolsGold's histories
    assert state.clients and all("fits" in c.values and "rounds" in c.arrays for c in state.clients.values())

    play(cfg, out, resume=True)
    assert rows(out) == rows(reference)
    assert all(torch.equal(model(out)[k], v) for k, v in model(reference).items())


FLIP = ("roles.benign=clients.FlipDefenseClient", "defense.name=foolsgold", "attack.num_malicious=1",
        "attack.force_sampled=true", "data.synthetic.image_size=16", "data.synthetic.train_size=1200",
        "data.synthetic.test_size=100", "federation.clients_per_round=3", "federation.num_rounds=3",
        "training.local_epochs=1", "flip_defense.schedule=fast", "flip_defense.batch_size=32",
        "flip_defense.local_epochs=1", "flip_defense.max_batches=2", "flip_defense.fast.min_steps=2",
        "flip_defense.fast.max_steps=3", "flip_defense.fast.pairs=1")


def test_a_flip_defended_foolsgold_run_resumes_with_its_trigger_caches_and_histories(tmp_path):
    cfg = tiny_config(*FLIP)
    reference = tmp_path / "reference"
    play(cfg, reference)
    out = tmp_path / "run"
    stop = threading.Event()
    with pytest.raises(RunInterrupted):
        play(cfg, out, LocalGrid(6, on_push=stop_when(stop, 2), silent=lambda msg, pid: stop.is_set()), stop=stop)
    state, _ = load_checkpoint(out)
    assert state.server_round == 1 and any(k.startswith("history/") for k in state.strategy)
    assert any(k.startswith("flip/") for c in state.clients.values() for k in c.arrays)  # FLIP trigger caches

    play(cfg, out, resume=True)
    assert rows(out) == rows(reference)
    assert all(torch.equal(model(out)[k], v) for k, v in model(reference).items())


class Crash(Exception):
    pass


def crash_when(server_round: int):
    """An on_push hook that dies while `server_round`'s TRAIN messages go out (as a kill -9 would)."""
    def hook(messages):
        if messages and train_round(messages[0]) == server_round:
            raise Crash
    return hook


def test_a_crash_between_checkpoints_replays_the_lost_rounds_exactly(reference, tmp_path):
    """Checkpoints every 2 rounds, a crash in round 6: round 4's checkpoint, rows up to 5 and a torn line are left."""
    cfg = tiny_config(*STATEFUL, "checkpoint.every=2")
    out = tmp_path / "run"
    with pytest.raises(Crash):
        play(cfg, out, LocalGrid(6, on_push=crash_when(6)))
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 6, "clean_')
    assert load_checkpoint(out)[0].server_round == 4
    assert [r["round"] for r in rows_until_torn(out)] == list(range(6))

    play(cfg, out, resume=True)
    assert rows(out) == rows(reference)
    assert all(torch.equal(model(out)[k], v) for k, v in model(reference).items())


def rows_until_torn(run_dir: Path) -> list[dict]:
    from flip_fl.experiments.results import read_rows

    return list(read_rows(run_dir / "metrics.jsonl"))


def test_lost_client_state_would_show(reference, tmp_path):
    """The resume test can fail: a checkpoint without the clients' states gives other numbers."""
    cfg = tiny_config(*STATEFUL)
    out = tmp_path / "run"
    stop = threading.Event()
    with pytest.raises(RunInterrupted):
        play(cfg, out, LocalGrid(6, on_push=stop_when(stop, 4), silent=lambda msg, pid: stop.is_set()), stop=stop)

    state, config_yaml = load_checkpoint(out)
    state.clients = {}
    save_checkpoint(out, state, config_yaml)
    play(cfg, out, resume=True)
    assert rows(out) != rows(reference)


def test_a_stuck_client_counts_as_failed_and_the_run_goes_on(tmp_path):
    cfg = tiny_config(*STATEFUL, "resources.round_timeout=0.3", "defense.name=fedavg")
    stuck = LocalGrid(6, silent=lambda msg, pid: pid == 1 and train_round(msg) == 2)
    summary = play(cfg, tmp_path / "run", stuck)
    got = rows(tmp_path / "run")
    assert [r["round"] for r in got] == list(range(7)) and summary["rounds"] == 6
    assert 1 in got[2]["sampled"] and {r["round"]: r["failed"] for r in got[1:] if r["failures"]} == {2: [1]}
    assert summary["total_failures"] == 1 and (tmp_path / "run" / "final_model.pt").is_file()


def test_a_federation_of_the_wrong_size_fails_at_once_with_the_fix(tmp_path):
    cfg = tiny_config(*STATEFUL)
    with pytest.raises(ConfigError, match='num-supernodes=6'):
        play(cfg, tmp_path / "run", LocalGrid(2))


def test_the_output_directory_is_never_truncated(reference, tmp_path):
    cfg = tiny_config(*STATEFUL)
    before = (reference / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        prepare(cfg, reference)
    assert (reference / "metrics.jsonl").read_text() == before
    with pytest.raises(ConfigError, match="holds no run"):
        prepare(cfg, tmp_path / "empty", resume=True)
    other = tiny_config(*STATEFUL, "seed=1")
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt"):
        (copy / name).write_bytes((reference / name).read_bytes())
    (copy / "mine.txt").write_text("not a run file")
    prepare(other, copy, overwrite=True)
    assert not (copy / "checkpoint.pt").exists() and (copy / "mine.txt").is_file()
    assert (copy / "metrics.jsonl").read_text() == ""


def test_a_finished_run_resumes_to_the_same_files(reference, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt"):
        (out / name).write_bytes((reference / name).read_bytes())
    summary = play(tiny_config(*STATEFUL), out, resume=True)
    assert summary["rounds"] == 6 and rows(out) == rows(reference)
    assert all(torch.equal(model(out)[k], v) for k, v in model(reference).items())
