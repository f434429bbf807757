"""Issue 25: the paper cuts a new user hit following the README, one test (or a few) per item.

Most cases call `cli.main(argv)` in this process with Ray and the sweep's runs replaced by tripwires (bad
input must be found before them); the one subprocess case runs `sim.py` as typed, because what it checks is
the command line itself.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from flip_fl.config import ConfigError, to_yaml
from flip_fl.config.loading import PROJECT_CONFIGS, resolve_config
from flip_fl.data import client_dataset
from flip_fl.experiments import cli
from flip_fl.experiments.plots import run_figure
from flip_fl.experiments.progress import PlainProgress, round_line
from flip_fl.experiments.results import RunRecorder
from flip_fl.experiments.round_files import RoundTables
from flip_fl.federation.checkpoint import RunState, save_checkpoint
from flip_fl.federation.client import ClientState, RoundInfo, load_client_class
from flip_fl.models import build_model, create_model
from tests.tiny import TINY, tiny_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.fixture
def tripwires(monkeypatch):
    """Reaching Ray or a sweep's runs means a bad input was not caught first: fail loudly."""
    def tripped(*args, **kwargs):
        raise AssertionError("bad input reached the runtime (Ray or a sweep run)")

    import flip_fl.experiments.run as run_module
    import flip_fl.experiments.sweep as sweep_module

    monkeypatch.setattr(run_module, "init_ray", tripped)
    monkeypatch.setattr(sweep_module, "run_point", tripped)


def main(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `cli.main(argv)` in this process."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "weights_only" not in err, err
    return lines[0]


def write_tiny(path: Path, **sections) -> Path:
    raw = json.loads(json.dumps(TINY))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


# ---- 1. a bare config name resolves against the project's configs/ ---------------------------------------------

def test_a_bare_config_name_is_looked_for_in_configs_and_the_run_says_which_file(tmp_path, monkeypatch, capsys,
                                                                                   tripwires):
    monkeypatch.chdir(tmp_path)
    code, out, err = main(["--config", "quickstart.yaml", "--set", "federation.num_clients=0"], capsys)
    assert code == 2 and "federation.num_clients: 0 is out of range" in one_error_line(err)  # it read the file
    assert out.strip() == f"config: {PROJECT_CONFIGS / 'quickstart.yaml'} (quickstart.yaml is not in the working " \
                          "directory)"
    assert resolve_config("synthetic.yaml", "sweeps") == PROJECT_CONFIGS / "sweeps" / "synthetic.yaml"
    # a path keeps meaning a path, a file in the working directory wins, and a name found nowhere names both places
    code, out, err = main(["--config", "./quickstart.yaml"], capsys)
    assert code == 2 and out == "" and one_error_line(err) == "error: quickstart.yaml: config file not found"
    (tmp_path / "quickstart.yaml").write_text("seed: 1\n")
    assert resolve_config("quickstart.yaml") == Path("quickstart.yaml")
    code, _, err = main(["--config", "nothere.yaml"], capsys)
    assert code == 2 and one_error_line(err) == (f"error: nothere.yaml: config file not found (neither in the "
                                                 f"working directory nor in {PROJECT_CONFIGS})")


# ---- 2. an output directory that cannot be created -------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_dir_under_proc_is_exit_2_naming_the_directory_and_the_reason(tmp_path, monkeypatch, capsys,
                                                                                 tripwires):
    monkeypatch.chdir(tmp_path)
    write_tiny(tmp_path / "base.yaml")
    code, _, err = main(["--config", "base.yaml", "--output-dir", "/proc/flip-fl-x/run"], capsys)
    assert code == 2
    assert one_error_line(err) == ("error: --output-dir: /proc/flip-fl-x/run cannot be created in /proc "
                                   "(No such file or directory)")


def test_read_only_and_forbidden_output_dirs_are_found_by_trying_and_leave_nothing(tmp_path, monkeypatch):
    """As root, permission bits stop nothing: the check creates and writes, then undoes it."""
    nested = tmp_path / "a" / "b" / "c"
    cli.check_output_dir(nested)
    assert list(tmp_path.iterdir()) == []  # the probe's directories are gone again
    cli.check_output_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(cli.tempfile, "mkstemp", read_only)
    with pytest.raises(ConfigError, match=rf"^--output-dir: {re.escape(str(tmp_path))} is not writable "
                                          r"\(Read-only file system\)$"):
        cli.check_output_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"cannot be created in .* \(Read-only file system\)$"):
        cli.check_output_dir(nested)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def forbidden(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(Path, "mkdir", forbidden)
    with pytest.raises(ConfigError, match=rf"^--output-dir: {re.escape(str(nested))} cannot be created in "
                                          rf"{re.escape(str(tmp_path))} \(Permission denied\)$"):
        cli.check_output_dir(nested)


# ---- 3. `flwr run` finds flower-superlink without an activated environment -------------------------------------

def test_the_flwr_run_test_puts_the_interpreters_bin_first_on_path_and_the_readme_says_to_activate(monkeypatch):
    from tests.test_lifecycle_e2e import flwr_env

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = flwr_env(Path("/tmp/flwr-home"), 1, 2)
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin", "/bin"]
    assert env["FLWR_HOME"] == "/tmp/flwr-home" and env["FLWR_LOCAL_CONTROL_API_PORT"] == "2"
    assert "`flower-superlink` by name, so the virtual environment must be activated" in README


# ---- 4. damaged checkpoints and initial models: one line, exit 2, a short reason -------------------------------

def tiny_model_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "model.pt"
    torch.save(create_model("tiny_cnn", 10, 1, 28).state_dict(), path)
    return path.read_bytes()


def tiny_checkpoint_bytes(tmp_path: Path, config_yaml: str) -> bytes:
    state = RunState(server_round=2, global_state={"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
                     strategy={"history": np.ones(4)},
                     clients={0: ClientState({"cache": np.zeros(3)}, {"rounds": 2, "name": "a"}), 3: ClientState()})
    (tmp_path / "ck").mkdir(exist_ok=True)
    return save_checkpoint(tmp_path / "ck", state, config_yaml).read_bytes()


def damaged(seed: int, good: bytes, cases: int = 12) -> list[tuple[str, bytes]]:
    """Seeded damaged files: random bytes, pickle and zip headers before random bytes, truncations, flipped bytes."""
    rng = random.Random(seed)
    issue = b"\x80\x02" + bytes(random.Random(7).getrandbits(8) for _ in range(4096))  # issue 25's example
    out = [("issue 25", issue), ("issue 25, randbytes", b"\x80\x02" + random.Random(7).randbytes(4096)),
           ("empty", b""), ("text", b"this is not a model\n")]
    for i in range(cases):
        out.append((f"random {i}", rng.randbytes(rng.randrange(1, 5000))))
        header = rng.choice([b"\x80\x02", b"\x80\x02}q\x00(X", b"\x80\x04\x95", b"\x80\x05\x95", b"PK\x03\x04",
                             b"\x80\x02c__builtin__\n"])
        out.append((f"header {header!r} {i}", header + rng.randbytes(rng.randrange(0, 3000))))
        out.append((f"truncated {i}", good[:rng.randrange(len(good))]))
        flipped = bytearray(good)
        for _ in range(rng.randrange(1, 12)):
            flipped[rng.randrange(len(flipped))] = rng.getrandbits(8)
        out.append((f"flipped {i}", bytes(flipped)))
    return out


def assert_short_one_line(err: ConfigError, prefix: str) -> None:
    text = str(err)
    assert "\n" not in text and text.startswith(prefix), text
    assert len(text) < 260 and "weights_only" not in text and "Weights only" not in text, text
    assert len(text) - len(prefix) <= 150, text  # the reason after the file's name is short


def structural_checkpoints(good_payload: dict) -> list[tuple[str, object]]:
    """Well-formed torch files that are not (whole) checkpoints."""
    broken_array = {"dtype": "<f4", "shape": [5], "data": torch.zeros(3, dtype=torch.uint8)}
    return [("a list", [1, 2]), ("format only", {"format": 1}), ("other format", {**good_payload, "format": 2}),
            ("round is text", {**good_payload, "round": "two"}), ("negative round", {**good_payload, "round": -1}),
            ("config is a number", {**good_payload, "config": 5}),
            ("array of the wrong size", {**good_payload, "global": {"w": broken_array}}),
            ("object dtype", {**good_payload, "global": {"w": {**broken_array, "dtype": "|O"}}}),
            ("clients not a mapping", {**good_payload, "clients": [1]}),
            ("client without arrays", {**good_payload, "clients": {0: {"values": {}}}}),
            ("generators damaged", {**good_payload, "rng": {"python": (3, (1, 2), None), "numpy": 1, "torch": 2}}),
            ("no generators", {k: v for k, v in good_payload.items() if k != "rng"})]


def test_fuzzed_checkpoints_are_loaded_or_refused_in_one_short_line(tmp_path, capfd):
    from flip_fl.experiments.run import open_run_dir

    cfg = tiny_config()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    good = tiny_checkpoint_bytes(tmp_path, to_yaml(cfg))
    good_payload = torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=True)
    cases = damaged(25, good)
    for name, payload in structural_checkpoints(good_payload):
        torch.save(payload, tmp_path / "structural.pt")
        cases.append((f"structural: {name}", (tmp_path / "structural.pt").read_bytes()))
    outcomes = {"loaded": 0, "refused": 0}
    for name, data in cases:
        (run_dir / "checkpoint.pt").write_bytes(data)
        try:
            open_run_dir(cfg, run_dir, resume=True, overwrite=False)
            outcomes["loaded"] += 1
        except ConfigError as err:
            assert_short_one_line(err, f"--resume: {run_dir}/checkpoint.pt")
            outcomes["refused"] += 1
        except Exception as err:  # noqa: BLE001 -- the point of the test: nothing else may escape
            pytest.fail(f"{name}: {type(err).__name__}: {err}")
    assert outcomes["refused"] >= len(cases) - 15 and capfd.readouterr() == ("", "")  # no warnings printed
    (run_dir / "checkpoint.pt").write_bytes(good)
    assert open_run_dir(cfg, run_dir, resume=True, overwrite=False).server_round == 2


def test_fuzzed_initial_models_are_loaded_or_refused_in_one_short_line(tmp_path, capfd):
    from flip_fl.experiments.run import load_initial_state

    good = tiny_model_bytes(tmp_path)
    path = tmp_path / "initial.pt"
    cfg = tiny_config(f"server.initial_model={path}")
    model = build_model(cfg.model, client_dataset(cfg, 0))
    structural = [{"conv.weight": 1.0}, {1: torch.ones(1)}, [torch.ones(2)], {"nope": torch.ones(2)}]
    cases = damaged(52, good)
    for i, payload in enumerate(structural):
        torch.save(payload, tmp_path / "structural.pt")
        cases.append((f"structural {i}", (tmp_path / "structural.pt").read_bytes()))
    refused = 0
    for name, data in cases:
        path.write_bytes(data)
        try:
            load_initial_state(cfg, model)
        except ConfigError as err:
            assert_short_one_line(err, f"server.initial_model: {path}")
            refused += 1
        except Exception as err:  # noqa: BLE001 -- the point of the test: nothing else may escape
            pytest.fail(f"{name}: {type(err).__name__}: {err}")
    assert refused >= len(cases) - 15 and capfd.readouterr() == ("", "")


def test_a_pickled_whole_model_as_initial_model_says_to_save_a_state_dict(tmp_path):
    from flip_fl.experiments.run import read_state_file

    torch.save(create_model("tiny_cnn", 10, 1, 28), tmp_path / "whole.pt")
    with pytest.raises(ConfigError) as err:
        read_state_file(tmp_path / "whole.pt", "server.initial_model")
    assert str(err.value) == (f"server.initial_model: {tmp_path}/whole.pt is not a tensors-only PyTorch file; refused, "
                              "nothing in it was run (UnpicklingError: it holds a pickled torch.nn.modules.container."
                              "Sequential); save a state_dict: torch.save(model.state_dict(), path)")


def test_resume_from_issue_25s_damaged_checkpoint_is_exit_2_with_one_line(tmp_path, monkeypatch, capsys, tripwires):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(tiny_config()))
    (run_dir / "checkpoint.pt").write_bytes(b"\x80\x02" + bytes(random.Random(7).getrandbits(8) for _ in range(4096)))
    code, _, err = main(["--resume", str(run_dir)], capsys)
    assert code == 2 and one_error_line(err) == (f"error: --resume: {run_dir}/checkpoint.pt: not a readable "
                                                 "checkpoint (not written by flip-fl: IndexError: pop from empty list)")
    (run_dir / "checkpoint.pt").write_bytes(tiny_checkpoint_bytes(tmp_path, to_yaml(tiny_config()))[:-100])
    code, _, err = main(["--resume", str(run_dir)], capsys)
    assert code == 2 and one_error_line(err) == (f"error: --resume: {run_dir}/checkpoint.pt: not a readable "
                                                 "checkpoint (damaged or truncated: OSError: Invalid argument)")


def test_a_checkpoint_whose_model_does_not_fit_is_a_config_error(tmp_path):
    from flip_fl.experiments.run import check_resumed_model

    model = create_model("tiny_cnn", 10, 1, 28)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    check_resumed_model(RunState(1, state, {}, {}), model, tmp_path)
    wrong = {**state, next(iter(state)): np.zeros(3, dtype=np.float32)}
    with pytest.raises(ConfigError, match=r"^--resume: .*checkpoint.pt: damaged: its global model does not fit"):
        check_resumed_model(RunState(1, wrong, {}, {}), model, tmp_path)


# ---- 5. and 6. subcommands: the nearest one suggested, all listed in --help ------------------------------------

@pytest.mark.parametrize("word, hint", [
    ("sweeep", "did you mean 'sweep'?"), ("label", "did you mean 'labels'?"), ("config-doc", "did you mean "
                                                                                             "'config-docs'?"),
    ("cifar.yaml", "to run a config file give it with --config: python sim.py --config cifar.yaml"),
    ("frobnicate", "the commands are sweep, labels, config-docs; a run needs --config FILE"),
])
def test_an_unknown_command_names_the_nearest_one(word, hint, capsys, tripwires):
    code, out, err = main([word, "--config", "x.yaml"], capsys)
    assert code == 2 and out == ""
    assert one_error_line(err) == f"error: unknown command {word!r}; {hint} (see python sim.py --help)"


@pytest.mark.e2e
def test_sim_py_sweeep_as_typed_suggests_sweep():
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "sim.py"), "sweeep", "--config", "configs/sweeps/x.yaml"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.splitlines() == ["error: unknown command 'sweeep'; did you mean 'sweep'? "
                                          "(see python sim.py --help)"]
    assert time.monotonic() - started < 60


def test_help_lists_every_command_and_each_has_its_own_help(capsys):
    code, out, _ = main(["--help"], capsys)
    assert code == 0
    for name, (_, text) in cli.COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(text)}$", out, re.M), out
    assert "python sim.py {sweep,labels,config-docs} ...   (each has its own --help)" in out
    assert "exit codes: 0 success; 2 bad input" in out
    for name in cli.COMMANDS:
        code, out, err = main([name, "--help"], capsys)
        assert code == 0 and out.startswith(f"usage: sim.py {name}") and err == "", (name, out[:300])
    code, _, err = main(["config-docs", "extra"], capsys)
    assert code == 2 and "unrecognized arguments: extra" in one_error_line(err)


# ---- 7. a sweep checks every point's files before the first run ------------------------------------------------

def test_a_sweep_without_its_checkpoint_fails_once_before_any_run_with_the_command_that_makes_it(
        tmp_path, monkeypatch, capsys, tripwires):
    monkeypatch.chdir(tmp_path)
    write_tiny(tmp_path / "base.yaml", server={"initial_model": "runs/synthetic_clean/final_model.pt"})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"defense.name": ["fedavg",
                                                                                                    "median"]}}))
    code, _, err = main(["sweep", "--config", "s.yaml"], capsys)
    assert code == 2 and one_error_line(err) == (
        "error: all 2 runs: server.initial_model: file not found: runs/synthetic_clean/final_model.pt; make it with: "
        "python sim.py --config configs/synthetic_clean.yaml --output-dir runs/synthetic_clean")
    assert not (tmp_path / "runs").exists()
    # the README's sweep, from a directory without the checkpoint: one line, at once
    started = time.process_time()
    code, out, err = main(["sweep", "--config", "synthetic.yaml", "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and one_error_line(err).startswith("error: all 26 runs: server.initial_model: file not found")
    assert "configs/sweeps/synthetic.yaml" in out and time.process_time() - started < 10
    assert not (tmp_path / "out").exists()


def test_a_point_of_its_own_with_a_bad_file_is_named(tmp_path, monkeypatch):
    from flip_fl.experiments.grid import load_sweep
    from flip_fl.experiments.sweep import check_points

    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.pt").write_text("not a model\n")
    write_tiny(tmp_path / "base.yaml")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "grid": {
        "server.initial_model": [None, "text.pt"]}}))
    sweep = load_sweep(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match=r"^run server.initial_model=text.pt: server.initial_model: text.pt is not "
                                          r"a tensors-only PyTorch file"):
        check_points(sweep.points, None)
    check_points(sweep.points[:1], None)


def test_every_project_checkpoint_has_a_maker_command_and_the_readme_names_its_configs():
    from flip_fl.experiments.run import maker_command

    needing = {}
    for config in sorted(PROJECT_CONFIGS.glob("*.yaml")):
        model = (yaml.safe_load(config.read_text()).get("server") or {}).get("initial_model")
        if model:
            needing[config.stem] = Path(model)
    assert len(needing) >= 6
    setup = README.split("## Tests")[0]
    for name, model in needing.items():
        command = maker_command(model)
        assert command and command.startswith("python sim.py --config configs/") and command.endswith(
            f"--output-dir {model.parent}"), (name, command)
        assert f"`{name}`" in setup or (name.startswith("digits") and "`digits*`" in setup), name
    assert "`configs/sweeps/synthetic.yaml`" in setup


# ---- 8. writing one's own client ----------------------------------------------------------------------------

def test_the_worked_client_example_in_docs_halves_the_benign_update(tmp_path, monkeypatch):
    from clients import BenignClient

    doc = (ROOT / "docs" / "CLIENTS.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "halve_client.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = load_client_class("halve_client.HalfStepClient", "roles.benign")
    cfg = tiny_config("training.local_epochs=1", "training.max_batches=3")
    data = client_dataset(cfg, 1)
    torch.manual_seed(0)
    global_state = build_model(cfg.model, data).state_dict()
    info = RoundInfo(server_round=3, malicious=False, attacking=False, attacker_index=None)
    cpu = torch.device("cpu")
    state = ClientState()
    halved = cls(cfg, 1, data, cpu, state, tmp_path).fit(global_state, info)
    benign = BenignClient(cfg, 1, data, cpu, ClientState(), tmp_path).fit(global_state, info)
    for name, value in halved.state.items():
        expected = (global_state[name] + benign.state[name]) / 2 if value.is_floating_point() else benign.state[name]
        torch.testing.assert_close(value, expected)
    assert halved.num_examples == len(data) and halved.metrics["rounds"] == 1.0 and state.values == {"rounds": 1}
    assert "python sim.py --config configs/quickstart.yaml --set roles.benign=halve_client.HalfStepClient" in doc
    assert "[docs/CLIENTS.md](docs/CLIENTS.md)" in README


@pytest.mark.parametrize("key", ["roles.benign", "roles.malicious"])
def test_a_client_module_that_cannot_be_imported_says_where_it_was_looked_for(key, tmp_path, monkeypatch, capsys,
                                                                              tripwires):
    monkeypatch.chdir(tmp_path)
    write_tiny(tmp_path / "base.yaml")
    code, _, err = main(["--config", "base.yaml", "--set", f"{key}=halve_clent.HalfStepClient", "--set",
                         "attack.num_malicious=1"], capsys)
    line = one_error_line(err)
    assert code == 2 and line == (f"error: {key}: cannot import module 'halve_clent' from the working directory or "
                                  "PYTHONPATH (No module named 'halve_clent')")
    doc = " ".join((ROOT / "docs" / "CLIENTS.md").read_text().split())
    assert line.replace(key, "roles.benign") in doc  # the doc shows the real message


# ---- 9. CPU-only torch ---------------------------------------------------------------------------------------

def test_the_readme_shows_the_cpu_only_torch_install_before_the_project_install():
    setup = README.split("## Tests")[0]
    cpu = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
    assert cpu in setup and setup.index(cpu) < setup.rindex('pip install -e ".[dev]"')


# ---- 10. small output issues ---------------------------------------------------------------------------------

DEFENDED = {"round": 2, "threshold": 0.0, "clean_acc": 0.9, "asr": 0.1, "sampled": [1, 2, 3, 4], "malicious": [1],
            "seconds": 1.5, "defense_kept": [2, 3, 4], "defense_rejected": [1], "detection_precision": 1.0,
            "detection_recall": 1.0}


def test_detection_precision_and_recall_show_on_the_round_line(capsys):
    assert round_line(DEFENDED) == ("round   2 | acc 0.9000 | asr 0.1000 | sampled 4 (1 mal) | rejected 1/4, "
                                    "precision 1.00, recall 1.00 | 1.5s")
    nothing = {**DEFENDED, "defense_kept": [1, 2, 3, 4], "defense_rejected": [], "detection_precision": None,
               "detection_recall": 0.0}
    assert "| rejected 0/4, precision -, recall 0.00 |" in round_line(nothing)
    assert round_line({**DEFENDED, "defense_skipped": True}).endswith("| defense skipped | 1.5s")
    undefended = {k: v for k, v in DEFENDED.items() if not k.startswith(("defense_", "detection_"))}
    assert "rejected" not in round_line(undefended) and "precision" not in round_line(undefended)
    PlainProgress(5).round_finished(DEFENDED)
    assert "precision 1.00, recall 1.00" in capsys.readouterr().out


def test_the_rejection_panel_is_scaled_to_the_trained_rounds_and_shows_both_lines():
    cfg = {"defense": {"name": "fedavg", "threshold": 0.5}, "attack": {"num_malicious": 0}}
    rows = [{"round": r, "clean_acc": 0.5, "asr": 0.1, "clean_acc_thresholded": 0.5, "asr_thresholded": 0.1,
             "clean_reject_rate": rate, "backdoor_reject_rate": rate} for r, rate in ((0, 1.0), (1, 0.04), (2, 0.02))]
    rejection = run_figure(rows, cfg).axes[1]
    assert rejection.get_ylim()[1] == pytest.approx(0.05 * 1.15)  # not 0..1 because of round 0
    assert [t.get_text() for t in rejection.texts] == ["off scale: round 0 clean 100%; round 0 triggered 100%"]
    clean, triggered = rejection.lines
    assert list(clean.get_ydata()) == list(triggered.get_ydata())  # equal rates ...
    assert clean.get_linestyle() != triggered.get_linestyle() and clean.get_linewidth() > triggered.get_linewidth()


def readme_pandas(run_dir: Path) -> dict:
    """Run the README's pandas snippet on `run_dir`; its variables."""
    snippet = re.search(r"```python\n(import pandas as pd\n.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(snippet.replace("runs/quickstart-20261121-101500", str(run_dir)), namespace)  # noqa: S102
    return namespace


@pytest.mark.parametrize("failed", [[], [6]], ids=["no failures", "one failed client"])
def test_the_readmes_pandas_recipe_reads_ids_and_errors_as_text(failed, tmp_path, capsys):
    recorder = RunRecorder(tmp_path, tiny_config(), sinks=[RoundTables(tmp_path)])
    for r in range(3):
        attacked = r > 0
        recorder.record_round({"round": r, "clean_acc": 0.5, "asr": 0.1, "asr_no_trigger": 0.0, "seconds": 1.0,
                               "sampled": [2, 6] if r else [], "malicious": [2] if r else [],
                               "attacking": [2] if attacked else [], "attack_round": attacked,
                               "failures": len(failed) if r == 2 else 0, "failed": failed if r == 2 else [],
                               "errors": [f"client {p}: RuntimeError: disk on fire" for p in failed] if r == 2 else [],
                               "client_metrics": {"2": {"train_seconds": 1.0}} if r else {}})
    recorder.close()
    rounds = readme_pandas(tmp_path)["rounds"]
    capsys.readouterr()
    for column in ("sampled", "malicious", "attacking", "failed", "errors"):
        assert pd.api.types.is_string_dtype(rounds[column]), (column, rounds[column].dtype)
    assert rounds["num_failed"].tolist() == [0, 0, len(failed)] and rounds["attack_round"].dtype == bool
    assert rounds["malicious"].tolist()[1:] == ["2", "2"]  # one id stays text
    assert rounds["errors"].str.contains("disk on fire").fillna(False).tolist() == [False, False, bool(failed)]


def test_the_readme_does_not_add_a_second_q_to_pytest():
    commands = [line for block in re.findall(r"```bash\n(.*?)```", README, re.S) for line in block.splitlines()
                if "pytest" in line]
    assert commands and not any(re.search(r"\s-q\b", line.split("#")[0]) for line in commands), commands
    assert "another `-q` hides the count of passed tests" in README


def test_a_data_root_that_the_dataset_does_not_read_is_named_in_the_loading_line():
    from flip_fl.experiments.run import loading_data

    assert loading_data(tiny_config()) == "loading data: synthetic"
    assert loading_data(tiny_config("data.root=/datasets")) == ("loading data: synthetic (data.root=/datasets is not "
                                                                "used: synthetic data does not come from files)")
    assert "not used" in loading_data(tiny_config("data.name=digits", "data.root=/datasets"))
    assert loading_data(tiny_config("data.name=mnist", "data.root=/datasets")) == "loading data: mnist"


# ---- 11. sweeps whose groups set different keys ----------------------------------------------------------------

@pytest.mark.parametrize("rows", [None, ["defense.name"]], ids=["default rows", "rows: [defense.name]"])
def test_groups_with_different_keys_share_the_undefended_run_and_labels_have_no_null(rows, tmp_path):
    from flip_fl.experiments.grid import load_sweep
    from flip_fl.experiments.report import write_report
    from tests.test_sweep import fake_run, write_spec

    extra = {"rows": rows} if rows else {}
    sweep = load_sweep(write_spec(tmp_path / "s.yaml", [
        {"attack.mode": ["continuous"], "defense.name": ["fedavg", "median"], "seed": [0]},
        {"attack.mode": ["continuous"], "defense.name": ["krum"], "defense.krum.num_malicious": [1, 2], "seed": [0]},
    ], **extra))
    for p in sweep.points:
        fake_run(tmp_path / "out" / "runs" / p.name, p.cfg, acc=0.9, asr=0.5)
    results = write_report(sweep, tmp_path / "out")
    assert {r["column"] for r in results} == {"synthetic / continuous"}
    assert [r["row"] for r in results] == ["fedavg", "median", "krum, defense.krum.num_malicious=1",
                                           "krum, defense.krum.num_malicious=2"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "no undefended run" not in table and "null" not in table
    assert "| krum, defense.krum.num_malicious=2 | synthetic / continuous | 2.00 | 1.0 | 1.00 | 1.00 |" in table
