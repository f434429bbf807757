"""A run's life cycle with real Flower + Ray: kill -9 and --resume, SIGINT/SIGTERM, a stuck client, `flwr run .`.

One uninterrupted 8-round quickstart is the reference for the resumed runs and for `flwr run`; a small
FLIP-defended run with FoolsGold aggregation is the reference for resuming client caches and strategy
state. Every run that is stopped or killed is a `sim.py` subprocess in its own process group, so the
test can check that nothing of it (Ray's GCS, raylet, workers) is left afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flip_fl.config import load_config
from flip_fl.experiments.run import run
from flip_fl.federation.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e  # real Flower + Ray simulations / command-line subprocesses

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["--config", "configs/quickstart.yaml", "--set", "federation.num_rounds=8"]
FLIP_FOOLSGOLD = ["--config", "configs/synthetic_flip.yaml", "--set", "federation.num_rounds=4",
                  "--set", "server.initial_model=null", "--set", "defense.name=foolsgold",
                  "--set", "flip.warmup_steps=10", "--set", "flip.refresh_steps=5", "--set", "flip.pair_steps=10",
                  "--set", "flip.repeat_steps=3", "--set", "flip.local_epochs=1", "--set", "flip.max_batches=4",
                  "--set", "attack.local_epochs=1"]


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields."""
    def strip(row: dict) -> dict:
        return {k: {p: strip(m) for p, m in v.items()} if k == "client_metrics" else v
                for k, v in row.items() if not k.endswith("seconds")}
    return [strip(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_model(a: Path, b: Path) -> bool:
    ma, mb = (torch.load(d / "final_model.pt", weights_only=True) for d in (a, b))
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def reference_run(args: list[str], out: Path) -> Path:
    """An uninterrupted run of `args` (config and --set items) in this process."""
    config = args[args.index("--config") + 1]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    run(load_config(ROOT / config, overrides), out, echo=False)
    return out


def start(args: list[str], env: dict | None = None, cwd: Path = ROOT) -> subprocess.Popen:
    """`sim.py ARGS` in its own process group, stdout and stderr piped."""
    return subprocess.Popen([sys.executable, str(ROOT / "sim.py"), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)


def wait_for_round(proc: subprocess.Popen, server_round: int, timeout: float = 300) -> None:
    """Read the run's output until its `round N` line (then round N + 1 is under way)."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith(f"round {server_round:>3} |"):
            return
        assert time.monotonic() < deadline, "the run is too slow"
    pytest.fail(f"the run ended before round {server_round}: {proc.stderr.read()}")  # type: ignore[union-attr]


def group_left(pgid: int, grace: float = 5.0) -> list[str]:
    """Live processes (zombies aside) still in process group `pgid` after up to `grace` seconds."""
    deadline = time.monotonic() + grace
    while True:
        out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True).stdout
        left = [line for line in out.splitlines()
                if line.split()[1] == str(pgid) and not line.split()[2].startswith("Z")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    return reference_run(QUICKSTART, tmp_path_factory.mktemp("reference") / "quickstart")


def test_kill_9_in_round_4_then_resume_gives_the_uninterrupted_quickstart(quickstart, tmp_path):
    out = tmp_path / "run"
    proc = start([*QUICKSTART, "--output-dir", str(out)])
    wait_for_round(proc, 3)
    time.sleep(0.3)  # into round 4
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert group_left(proc.pid) == []
    assert load_checkpoint(out)[0].server_round == 3 and (out / "config.yaml").is_file()
    assert not (out / "summary.json").exists()

    resumed = subprocess.run([sys.executable, "sim.py", "--resume", str(out)], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert rows(out) == rows(quickstart) and same_model(out, quickstart)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_within_10s_with_a_checkpoint_and_one_line(sig, code, tmp_path):
    out = tmp_path / "run"
    proc = start([*QUICKSTART, "--output-dir", str(out)])
    wait_for_round(proc, 2)
    sent = time.monotonic()
    os.kill(proc.pid, sig)
    time.sleep(0.5)
    if proc.poll() is None:
        os.kill(proc.pid, sig)  # a second one while it stops changes nothing
    stdout, stderr = proc.communicate(timeout=60)
    seconds = time.monotonic() - sent
    assert proc.returncode == code and seconds < 10, (proc.returncode, seconds, stderr)
    assert group_left(proc.pid) == []
    last = rows(out)[-1]["round"]
    assert last >= 2 and load_checkpoint(out)[0].server_round == last
    assert stderr.strip() == f"interrupted after round {last}; resume with: python sim.py --resume {out}"
    assert "Traceback" not in stdout + stderr


def test_a_stuck_client_is_a_counted_failure_and_the_run_ends_normally(tmp_path):
    (tmp_path / "stuck_clients.py").write_text(
        "import time\n"
        "from clients import BenignClient\n"
        "class StuckClient(BenignClient):\n"
        "    def fit(self, global_state, info):\n"
        "        if self.partition_id == 1 and info.server_round == 2:\n"
        "            time.sleep(3600)\n"
        "        return super().fit(global_state, info)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    args = ["--config", str(ROOT / "configs/quickstart.yaml"), "--output-dir", str(tmp_path / "run"),
            "--set", "clients.benign=stuck_clients.StuckClient", "--set", "attack.num_malicious=0",
            "--set", "federation.num_clients=6", "--set", "federation.clients_per_round=6",
            "--set", "federation.num_rounds=3", "--set", "resources.round_timeout=25"]
    proc = start(args, env=env, cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert group_left(proc.pid) == []
    assert {r["round"]: r.get("failed", []) for r in rows(tmp_path / "run")} == {0: [], 1: [], 2: [1], 3: []}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["total_failures"] == 1 and summary["rounds"] == 3


def test_kill_9_then_resume_restores_flip_caches_and_foolsgold_histories(tmp_path):
    reference = reference_run(FLIP_FOOLSGOLD, tmp_path / "reference")
    out = tmp_path / "run"
    proc = start([*FLIP_FOOLSGOLD, "--output-dir", str(out)])
    wait_for_round(proc, 2)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state, _ = load_checkpoint(out)
    assert state.server_round == 2 and any(k.startswith("history/") for k in state.strategy)
    assert any(k.startswith("flip/") for c in state.clients.values() for k in c.arrays)

    resumed = subprocess.run([sys.executable, "sim.py", "--resume", str(out)], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert rows(out) == rows(reference) and same_model(out, reference)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_superlink(api_port: int) -> None:
    """End the local SuperLink `flwr run` started for this test (and its process groups), whatever happened."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,args="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, pgid, args = line.split(None, 2)
        if f"--port {api_port}" in args or f"--runtime-api-address 127.0.0.1:{api_port}" in args:
            for target in {int(pgid), int(pid)}:
                try:
                    os.killpg(target, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def test_flwr_run_gives_the_same_metrics_as_sim_py(quickstart, tmp_path):
    """The README's offline `flwr run` command, on its own SuperLink ports and FLWR_HOME, stopped afterwards."""
    api_port, control_port = free_port(), free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(api_port), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)}
    out = tmp_path / "flwr-run"
    flwr = Path(sys.executable).with_name("flwr")
    cmd = [str(flwr), "run", ".", "--stream", "--federation-config", "num-supernodes=20 client-resources-num-cpus=1",
           "--run-config", f"workdir='{ROOT}' output-dir='{out}' overrides='federation.num_rounds=8'"]
    try:
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # `flwr run` exits 0 even when the run fails: a finished run is one with summary.json
        assert (out / "summary.json").is_file(), result.stdout[-3000:]
        assert rows(out) == rows(quickstart) and same_model(out, quickstart)

        wrong = subprocess.run([*cmd[:4], "--federation-config", "num-supernodes=2", "--run-config",
                                f"workdir='{ROOT}' output-dir='{tmp_path / 'wrong'}'"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
        assert 'federation.num_clients: the config has 20 clients but the federation has 2 nodes; run it with ' \
               '--federation-config "num-supernodes=20"' in wrong.stdout + wrong.stderr
        assert not (tmp_path / "wrong" / "summary.json").exists()
    finally:
        stop_superlink(api_port)
