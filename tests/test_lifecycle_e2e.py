"""A run's life cycle with real Flower + Ray, in one test (each start of Ray costs seconds on 2 cores).

The README's offline `flwr run` command runs the 8-round quickstart uninterrupted; the same run under
`python sim.py` is stopped by SIGINT, resumed, stopped by SIGTERM, resumed, killed with SIGKILL in the middle
of a round, and resumed to the end: its `metrics.jsonl` and `final_model.pt` must equal `flwr run`'s. Every
`sim.py` is a subprocess in its own process group, so the test can check that nothing of it (Ray's GCS,
raylet, workers) is left afterwards. The server loop's other paths (stuck clients, checkpoint intervals,
crashes between checkpoints, FLIP caches, FoolsGold) are covered without Ray in tests/test_loop.py.
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

from flip_fl.federation.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e  # real Flower + Ray simulations / command-line subprocesses

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 8


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields."""
    def strip(row: dict) -> dict:
        return {k: {p: strip(m) for p, m in v.items()} if k == "client_metrics" else v
                for k, v in row.items() if not k.endswith("seconds")}
    return [strip(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_model(a: Path, b: Path) -> bool:
    ma, mb = (torch.load(d / "final_model.pt", weights_only=True) for d in (a, b))
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_flower(flwr_home: Path, grace: float = 10.0) -> list[str]:
    """Kill every process started with this FLWR_HOME (the SuperLink `flwr run` leaves running, its SuperExec
    and simulation); returns those still alive after `grace` seconds (zombies aside)."""
    marker = f"FLWR_HOME={flwr_home}".encode()

    def ours() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0") \
                        and (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
                    pids.append(int(proc.name))
            except OSError:
                pass
        return pids

    deadline = time.monotonic() + grace
    while (left := ours()) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return [Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")[:200] for pid in ours()]


def flwr_env(flwr_home: Path, api_port: int, control_port: int) -> dict[str, str]:
    """The environment of `flwr run`: its own FLWR_HOME and ports, offline, and the interpreter's bin directory
    first on PATH (`flwr` starts `flower-superlink` by name: the suite may run as /path/to/venv/bin/python -m
    pytest without the virtual environment activated)."""
    path = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")]))
    return {**os.environ, "PATH": path, "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(api_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)}


def flwr_run(out: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """The README's offline `flwr run` command, on its own SuperLink ports and FLWR_HOME, stopped afterwards."""
    api_port, control_port = free_port(), free_port()
    flwr_home = tmp_path / "flwr"
    env = flwr_env(flwr_home, api_port, control_port)
    cmd = [str(Path(sys.executable).with_name("flwr")), "run", ".", "--stream",
           "--federation-config", "num-supernodes=20 client-resources-num-cpus=1",
           "--run-config", f"workdir='{ROOT}' output-dir='{out}' overrides='federation.num_rounds={ROUNDS}'"]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        assert stop_flower(flwr_home) == []


def stop_with(sig: signal.Signals, args: list[str], after_round: int, code: int, out: Path) -> None:
    """Start `sim.py ARGS`, send `sig` once round `after_round` is recorded (twice: a repeat changes nothing)."""
    proc = start(args)
    wait_for_round(proc, after_round)
    sent = time.monotonic()
    os.kill(proc.pid, sig)
    time.sleep(0.5)
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=60)
    seconds = time.monotonic() - sent
    print(f"{sig.name}: exit {proc.returncode} {seconds:.1f}s after the signal")
    assert proc.returncode == code and seconds < 10, (proc.returncode, seconds, stderr)
    assert group_left(proc.pid) == []
    last = rows(out)[-1]["round"]
    assert last >= after_round and load_checkpoint(out)[0].server_round == last
    assert stderr.strip() == f"interrupted after round {last}; resume with: python sim.py --resume {out}"
    assert "Traceback" not in stdout + stderr


def test_flwr_run_equals_a_sim_py_run_stopped_by_sigint_sigterm_and_kill_9_then_resumed(tmp_path):
    reference = tmp_path / "flwr-run"
    result = flwr_run(reference, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # `flwr run` exits 0 even when the run fails: a finished run is one with summary.json
    assert (reference / "summary.json").is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    assert [r["round"] for r in rows(reference)] == list(range(ROUNDS + 1))

    out = tmp_path / "sim"
    stop_with(signal.SIGINT, ["--config", "configs/quickstart.yaml", "--set", f"federation.num_rounds={ROUNDS}",
                              "--output-dir", str(out)], 2, 130, out)
    stop_with(signal.SIGTERM, ["--resume", str(out)], 4, 143, out)

    proc = start(["--resume", str(out)])
    wait_for_round(proc, 5)
    time.sleep(0.3)  # into round 6
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert group_left(proc.pid) == []
    assert load_checkpoint(out)[0].server_round == 5 and not (out / "summary.json").exists()

    resumed = subprocess.run([sys.executable, "sim.py", "--resume", str(out)], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert rows(out) == rows(reference) and same_model(out, reference)
