"""User plug-ins by dotted path: the example defense and trigger of `examples/`, as a user would use them.

In process (no Ray): the defense's rule on hand-built updates, its parameters reaching the strategy, the
command line's one-line errors (exit 2) for a bad path, a class of the wrong family, an unknown or out-of-range
parameter, and the trigger built through `create_trigger`. One real run (`sim.py` in a subprocess, the
examples on PYTHONPATH, marked e2e) shows the decision in metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from flip_fl.attacks.triggers import Trigger, build_trigger, create_trigger
from flip_fl.config import ConfigError, defense_params
from flip_fl.experiments import cli
from strategies import Defense, RoundUpdates, build_strategy
from strategies.defense import detection_fields
from tests.tiny import TINY, tiny_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HALVE = "defense.name=halve_defense.HalveDefense"
CORNER = "attack.trigger=corner_trigger.CornerTrigger"


@pytest.fixture
def examples(monkeypatch):
    """`examples/` importable, as PYTHONPATH=examples makes it for `sim.py`."""
    monkeypatch.syspath_prepend(str(EXAMPLES))


def halve_strategy(*overrides: str) -> Defense:
    cfg = tiny_config(HALVE, "federation.num_clients=5", "federation.clients_per_round=5", *overrides)
    return build_strategy(cfg, {100 + pid: pid for pid in range(5)}, {})


# ------------------------------------------------------------------------------------------ the defense


def test_halve_rejects_the_planted_outlier_and_scales_the_weighted_mean(examples):
    strategy = halve_strategy("defense.HalveDefense.factor=0.5", "defense.HalveDefense.max_ratio=3")
    assert type(strategy).__name__ == "HalveDefense" and (strategy.factor, strategy.max_ratio) == (0.5, 3.0)
    matrix = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [30.0, 0.0, 0.0]])
    updates = RoundUpdates(1, matrix, np.array([10.0, 20.0, 30.0, 40.0, 50.0]), (0, 1, 2, 3, 4))
    delta, decision = strategy.rule(updates)
    # norms 1, 1, 1, sqrt 2, 30; median 1: the 30 is rejected. Kept weights 10..40 (sum 100):
    # (10 e1 + 20 e2 + 30 e3 + 40 (e1 + e2)) / 100 = (0.5, 0.6, 0.3), times factor 0.5.
    np.testing.assert_allclose(delta, [0.25, 0.3, 0.15])
    np.testing.assert_allclose(decision.weights, [0.1, 0.2, 0.3, 0.4, 0.0])
    assert decision.kept.tolist() == [True, True, True, True, False]
    assert decision.info == {"factor": 0.5, "median_norm": 1.0}
    fields = detection_fields(list(updates.clients), [4], decision)
    assert fields["defense_kept"] == [0, 1, 2, 3] and fields["defense_rejected"] == [4]
    assert fields["detection_recall"] == 1.0 and fields["detection_false_positive_rate"] == 0.0
    assert fields["defense_factor"] == 0.5 and fields["defense_median_norm"] == 1.0


def test_halve_parameters_come_from_their_section_and_default_without_it(examples):
    cfg = tiny_config(HALVE, "defense.HalveDefense.factor=0.25")
    assert (defense_params(cfg).factor, defense_params(cfg).max_ratio) == (0.25, 3.0)
    assert halve_strategy("defense.HalveDefense.factor=0.25").factor == 0.25
    assert halve_strategy().factor == 0.5
    equal = RoundUpdates(1, np.ones((4, 2)), np.ones(4), (0, 1, 2, 3))
    delta, decision = halve_strategy().rule(equal)
    np.testing.assert_allclose(delta, [0.5, 0.5])
    assert decision.kept.all() and decision.info["median_norm"] == pytest.approx(np.sqrt(2))


# ------------------------------------------------------------------------------------------ config errors


@pytest.fixture
def workspace(tmp_path, monkeypatch, examples):
    """A working directory with a tiny config; reaching Ray fails the test."""
    import flip_fl.experiments.run as run_module

    def tripped(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a bad input reached Ray")

    monkeypatch.setattr(run_module, "init_ray", tripped)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY))
    return tmp_path


@pytest.mark.parametrize("sets, expected", [
    ([HALVE.replace("halve_defense", "no_such_module")],
     "defense.name: cannot import module 'no_such_module' from the working directory or PYTHONPATH"),
    (["defense.name=halve_defense.NoSuchDefense"], "defense.name: module 'halve_defense' has no class 'NoSuchDefense'"),
    (["defense.name=corner_trigger.CornerTrigger"],
     "defense.name: corner_trigger.CornerTrigger does not subclass strategies.defense.Defense"),
    ([HALVE, "defense.HalveDefense.factr=0.5"], "defense.HalveDefense.factr: unknown key; did you mean 'factor'?"),
    ([HALVE, "defense.HalveDefense.factor=0"], "defense.HalveDefense.factor: 0.0 is out of range; it must be > 0.0"),
    ([HALVE, "defense.HalveDefense.factor=1.5"], "defense.HalveDefense.factor: 1.5 is out of range; it must be <= 1.0"),
    ([HALVE, "defense.HalveDefense.max_ratio=0.5"], "defense.HalveDefense.max_ratio: 0.5 is out of range"),
    (["defense.HalveDefense.factor=0.5"], "defense.HalveDefense: unknown key"),  # defense.name left at fedavg
    (["attack.trigger=halve_defense.HalveDefense"],
     "attack.trigger: halve_defense.HalveDefense does not subclass flip_fl.attacks.triggers.Trigger"),
    ([CORNER, "attack.trigger_args.size=40"], "attack.trigger_args: corner: square rows 0..39"),
    ([CORNER, "attack.trigger_args.colour=1"], "attack.trigger_args: unknown parameter(s) ['colour']"),
], ids=["unimportable", "no such class", "not a Defense", "unknown key", "factor 0", "factor 1.5", "max_ratio",
        "section of another defense", "not a Trigger", "square too big", "unknown trigger arg"])
def test_bad_user_plugin_settings_are_exit_2_with_one_line_naming_the_key(sets, expected, workspace, capsys):
    code = cli.main(["--config", "base.yaml", *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err


def test_bad_user_plugin_settings_are_config_errors_in_load_config(examples, tmp_path):
    from flip_fl.config import load_config

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY))
    with pytest.raises(ConfigError, match=r"^defense\.HalveDefense\.factor: -1\.0 is out of range") as err:
        load_config(tmp_path / "base.yaml", [HALVE, "defense.HalveDefense.factor=-1"])
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ the trigger


def test_corner_trigger_builds_by_dotted_path_and_stamps_the_corner_only(examples):
    trigger = create_trigger("corner_trigger.CornerTrigger", (3, 8, 8), size=2, value=0.75)
    assert isinstance(trigger, Trigger) and trigger.num_pieces == 1
    x = torch.rand(4, 3, 8, 8) * 0.5
    before = x.clone()
    out = trigger.apply(x)
    assert torch.equal(x, before) and out.dtype == x.dtype and out.shape == x.shape  # input untouched
    mask = trigger.mask()
    assert mask.sum() == 4 and mask[:2, :2].all()
    assert (out[:, :, :2, :2] == 0.75).all() and torch.equal(out[:, :, ~mask], x[:, :, ~mask])
    assert torch.equal(trigger.apply(x[0]), out[0])  # one C x H x W image too
    with pytest.raises(ValueError, match="unknown parameter"):
        create_trigger("corner_trigger.CornerTrigger", (3, 8, 8), side=2)


def test_corner_trigger_takes_its_arguments_from_the_config(examples):
    cfg = tiny_config(CORNER, "attack.trigger_args.size=4")
    trigger = build_trigger(cfg.attack, (1, 28, 28))
    assert type(trigger).__name__ == "CornerTrigger" and trigger.size == 4 and trigger.mask().sum() == 16


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def user_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`sim.py` with both examples from a user's folder on PYTHONPATH: 4 clients, all sampled, 2 rounds.

    Client 3 is a model-replacement attacker (update x20): the defense's outlier.
    """
    work = tmp_path_factory.mktemp("user_plugins")
    plugins = work / "my_plugins"
    plugins.mkdir()
    for name in ("halve_defense.py", "corner_trigger.py"):
        shutil.copy(EXAMPLES / name, plugins / name)
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["synthetic"] = {"train_size": 480, "test_size": 200}
    cfg["federation"] = {"num_clients": 4, "clients_per_round": 4, "num_rounds": 2}
    cfg["training"]["local_epochs"] = 1
    cfg["roles"] = {"malicious": "clients.ModelReplacementClient"}
    cfg["attack"] = {"num_malicious": 1, "malicious_ids": [3], "scale": 20.0, "trigger_args": {"size": 4}}
    (work / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(plugins)}  # the user's modules, as a user would make them importable
    argv = ["--config", "run.yaml", "--output-dir", "out", "--set", HALVE, "--set", "defense.HalveDefense.factor=0.25",
            "--set", CORNER]
    result = subprocess.run([sys.executable, str(ROOT / "sim.py"), *argv], cwd=work, capture_output=True, text=True,
                            timeout=300, env=env)
    return result, work / "out"


@pytest.mark.e2e
def test_a_user_defense_and_trigger_by_dotted_path_run_and_report_the_decision(user_run):
    result, out = user_run
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["failures"] == 0 and r["attacking"] == [3] and r["client_metrics"]["3"]["attacked"] == 1.0
        assert r["defense_clients"] == [0, 1, 2, 3]
        assert r["defense_kept"] == [0, 1, 2] and r["defense_rejected"] == [3]
        assert r["detection_recall"] == 1.0 and r["detection_false_positive_rate"] == 0.0
        assert r["defense_weights"][3] == 0.0 and r["defense_attacker_weight"] == 0.0
        assert r["defense_factor"] == 0.25 and r["defense_median_norm"] > 0  # defense.HalveDefense.factor arrived
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["defense"]["name"] == "halve_defense.HalveDefense"
    assert resolved["defense"]["HalveDefense"]["factor"] == 0.25
    assert resolved["attack"]["trigger"] == "corner_trigger.CornerTrigger"
