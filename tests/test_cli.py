"""The command line contract: exit codes and one-line errors (run as a user would, in a subprocess).

The subprocesses start together (two at a time) when the first test needs them: each spends seconds
importing torch and Flower, and the machine has cores to spare.
"""

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # real Flower + Ray simulations / command-line subprocesses

ROOT = Path(__file__).resolve().parents[1]


def sim(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sim.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


BAD_INPUT = [
    (["--config", "configs/quickstart.yaml", "--set", "federation.num_client=3"],
     "error: federation.num_client: unknown key; did you mean 'num_clients'?"),
    (["--config", "configs/quickstart.yaml", "--set", "client.lr=fast"], "error: client.lr: expected a number"),
    (["--config", "configs/quickstart.yaml", "--set", "attack.num_malicious=30"],
     "error: attack.num_malicious: 30 exceeds"),
    (["--config", "configs/quickstart.yaml", "--set", "clients.benign=flip_fl.config.Config"],
     "error: clients.benign: flip_fl.config.Config does not subclass flip_fl.federation.client.BaseClient"),
    (["--config", "configs/quickstart.yaml", "--set", "clients.benign=nowhere.Client"],
     "error: clients.benign: cannot import module 'nowhere'"),
    (["--config", "configs/quickstart.yaml", "--set", "data.name=mnist", "--set", "data.root=/nonexistent/flipfl"],
     "error: data.root: no mnist files found at /nonexistent/flipfl/MNIST/raw"),
    (["--config", "configs/quickstart.yaml", "--set", "server.initial_model=/nonexistent.pt"],
     "error: server.initial_model: file not found"),
    (["--config", "no/such.yaml"], "error: no/such.yaml: config file not found"),
    (["--config"], "error: argument --config: expected one argument"),
    (["--resume", "/nonexistent/run"], "error: --resume: /nonexistent/run holds no run (no config.yaml)"),
    (["--resume", "configs", "--set", "seed=1"],
     "error: --resume: continues the run with its own config.yaml; drop --set"),
    ([], "error: --config: required (or --resume RUN_DIR to continue a run)"),
]


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """Every command of this module, run concurrently."""
    commands = [tuple(args) for args, _ in BAD_INPUT] + [("config-docs",)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(commands, pool.map(lambda args: sim(*args), commands)))


@pytest.mark.parametrize("args, expected", BAD_INPUT)
def test_bad_input_exits_2_with_one_line(results, args, expected):
    result = results[tuple(args)]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr


def test_config_docs_command_prints_the_reference(results):
    result = results[("config-docs",)]
    assert result.returncode == 0 and "| `attack.target_label` |" in result.stdout


def test_an_unreachable_ray_address_exits_1_with_one_line_at_once():
    started = time.monotonic()
    result = sim("--config", "configs/quickstart.yaml", "--ray-address", "127.0.0.1:1")
    seconds = time.monotonic() - started
    assert result.returncode == 1 and seconds < 60, (result.returncode, seconds, result.stderr)
    assert result.stderr.strip() == "error: simulation failed: cannot reach Ray at 127.0.0.1:1: Connection refused"
