"""metrics.csv, client_metrics.csv and the TensorBoard event file, read back the way a researcher reads them."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flip_fl.config import ConfigError
from flip_fl.experiments.results import RunRecorder
from flip_fl.experiments.round_files import RoundTables, TensorBoardLog, client_rows, flat_row
from tests.tiny import tiny_config

ROWS = [
    {"round": 0, "threshold": 0.0, "clean_acc": 0.098, "asr": 0.0, "asr_no_trigger": 0.0, "sampled": [],
     "malicious": [], "attacking": [], "failures": 0, "seconds": 0.6},
    {"round": 1, "threshold": 0.0, "clean_acc": 0.1, "asr": 1.0, "asr_no_trigger": 1.0, "sampled": [1, 6, 8],
     "malicious": [1, 8], "attacking": [1], "attack_round": True, "failures": 1, "failed": [6],
     "errors": ["RuntimeError: disk on fire"], "client_train_seconds": 1.5,
     "client_metrics": {"1": {"train_seconds": 2.0, "update_norm": 0.9}, "8": {"train_seconds": 1.0}},
     "seconds": 9.4},
    {"round": 2, "threshold": 0.0, "clean_acc": 0.5, "asr": 0.25, "asr_no_trigger": None, "sampled": [2, 8],
     "malicious": [8], "attacking": [], "attack_round": False, "failures": 0, "failed": [], "errors": [],
     "client_metrics": {"2": {"train_seconds": 0.5}, "8": {"train_seconds": 0.25, "invert_seconds": 0.125}},
     "detection_tp": 1, "defense_kept": [2], "seconds": 1.7},
]


def write_run(tmp_path: Path, tensorboard: bool = False) -> Path:
    sinks = [RoundTables(tmp_path)] + ([TensorBoardLog(tmp_path / "tensorboard")] if tensorboard else [])
    recorder = RunRecorder(tmp_path, tiny_config(), sinks=sinks)
    for row in ROWS:
        recorder.record_round(row)
    recorder.close()
    return tmp_path


def test_metrics_csv_is_one_typed_row_per_round(tmp_path: Path):
    write_run(tmp_path)
    frame = pd.read_csv(tmp_path / "metrics.csv")
    assert list(frame["round"]) == [0, 1, 2] and frame["round"].dtype == "int64"
    assert frame["attack_round"].dtype == bool and list(frame["attack_round"]) == [False, True, False]
    assert frame["failures"].dtype == "int64" and list(frame["num_sampled"]) == [0, 3, 2]
    assert frame["clean_acc"].dtype == "float64" and frame["clean_acc"].tolist() == [0.098, 0.1, 0.5]
    assert frame["asr_no_trigger"].isna().tolist() == [False, False, True]  # None -> empty -> NaN
    assert frame.loc[1, "sampled"] == "1 6 8" and frame.loc[1, "errors"] == "RuntimeError: disk on fire"
    assert frame.loc[2, "detection_tp"] == 1 and pd.isna(frame.loc[1, "detection_tp"])  # late column: file widened
    assert "client_metrics" not in frame.columns
    with (tmp_path / "metrics.csv").open() as fh:
        assert sum(1 for _ in csv.reader(fh)) == 4  # header + one line per round


def test_client_metrics_csv_is_one_row_per_sampled_client_and_round(tmp_path: Path):
    write_run(tmp_path)
    frame = pd.read_csv(tmp_path / "client_metrics.csv")
    assert list(zip(frame["round"], frame["partition"])) == [(1, 1), (1, 6), (1, 8), (2, 2), (2, 8)]
    assert frame["malicious"].tolist() == [True, False, True, False, True]
    assert frame["attacking"].tolist() == [True, False, False, False, False]
    assert frame["failed"].tolist() == [False, True, False, False, False]
    assert frame["train_seconds"].tolist()[:1] == [2.0] and pd.isna(frame.loc[1, "train_seconds"])
    assert frame.loc[4, "invert_seconds"] == 0.125 and frame.loc[0, "update_norm"] == 0.9


def test_flat_rows_fill_round_zero_and_keep_lists_readable():
    first = flat_row(ROWS[0])
    assert first["attack_round"] is False and first["num_failed"] == 0 and first["sampled"] == ""
    assert flat_row(ROWS[2])["defense_kept"] == "2" and client_rows(ROWS[0]) == []


def test_tensorboard_event_file_holds_every_numeric_column_per_round(tmp_path: Path):
    write_run(tmp_path, tensorboard=True)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"clean_acc", "asr", "asr_no_trigger", "failures", "attack_round", "client_train_seconds"} <= tags
    assert "sampled" not in tags and "errors" not in tags  # text columns are not scalars
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("clean_acc")] == [(0, 0.098), (1, 0.1), (2, 0.5)]
    assert [e.step for e in acc.Scalars("asr_no_trigger")] == [0, 1]  # missing in round 2: no point
    assert [e.value for e in acc.Scalars("attack_round")] == [0.0, 1.0, 0.0]


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    import builtins

    from flip_fl.experiments import round_files

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"results.tensorboard: needs the tensorboard package"):
        round_files.check_tensorboard()
