"""Running a sweep: every point of the grid as its own process, finished runs reused, then the report.

Every run is a subprocess `python -m flip_fl.experiments.cli --config RUN/requested.yaml --output-dir RUN`
under `SWEEP_DIR/runs/<key=value__...>/`, so a crash or a stop ends one run, not the sweep; runs
go one at a time unless `jobs` > 1 (each has its own local Ray cluster). A run
whose directory holds summary.json is not rerun (its config must equal the requested one); an interrupted
run continues from its checkpoint next time (`--resume`), a run that failed before its first checkpoint
starts over (`--overwrite`), and both show as failed in the table until they finish.

Before the first run, every point still to run is checked as `sim.py` would check it before Ray (client
classes, resources, data files, the initial model file), so a missing checkpoint fails the sweep once, with
the command that makes it, instead of failing every run a few seconds in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import yaml

from flip_fl.config import Config, ConfigError, config_from_dict, to_yaml
from flip_fl.experiments.grid import Point, Sweep
from flip_fl.experiments.progress import duration
from flip_fl.experiments.report import error_line, write_report

CLI_MODULE = "flip_fl.experiments.cli"


def run_config(run_dir: Path) -> Config | None:
    """The config of the run in `run_dir` (None when there is none or it is unreadable)."""
    try:
        return config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    except (OSError, ConfigError, yaml.YAMLError):
        return None


def finished_config(run_dir: Path) -> Config | None:
    """The config of a finished run in `run_dir` (None when it has not finished)."""
    if not (run_dir / "summary.json").is_file():
        return None
    return run_config(run_dir)


def check_finished(sweep: Sweep, sweep_dir: Path) -> None:
    """A finished run directory must hold the config its point asks for (else the table would lie)."""
    for point in sweep.points:
        run_dir = sweep_dir / "runs" / point.name
        if (run_dir / "summary.json").is_file() and finished_config(run_dir) != point.cfg:
            raise ConfigError(f"{run_dir}: a finished run with a different config is in the way; "
                              "delete it or choose another --output-dir")


def check_points(points: list[Point], ray_address: str | None) -> None:
    """Each point's inputs that need no data (`run.check_inputs`); one ConfigError for the first problem found.

    A problem every point shares (the usual case: the base config's checkpoint is missing) is named once.
    """
    from flip_fl.experiments.run import check_inputs  # imported here: it brings Flower, which reports do not need

    problems: dict[str, list[str]] = {}
    for point in points:
        try:
            check_inputs(point.cfg, ray_address)
        except ConfigError as err:
            problems.setdefault(str(err), []).append(point.name)
    if not problems:
        return
    message, names = next(iter(problems.items()))
    if len(names) == len(points) and len(points) > 1:
        raise ConfigError(f"all {len(points)} runs: {message}")
    more = f" (and {len(names) - 1} more runs)" if len(names) > 1 else ""
    raise ConfigError(f"run {names[0]}{more}: {message}")


def run_point(point: Point, run_dir: Path, ray_address: str | None) -> tuple[bool, str]:
    """Run one point as a command-line subprocess; (ok, one-line outcome)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    requested = run_dir / "requested.yaml"
    requested.write_text(to_yaml(point.cfg))
    resumable = (run_dir / "checkpoint.pt").is_file() and run_config(run_dir) == point.cfg
    if resumable:
        cmd = [sys.executable, "-m", CLI_MODULE, "--resume", str(run_dir)]
    else:
        cmd = [sys.executable, "-m", CLI_MODULE, "--config", str(requested), "--output-dir", str(run_dir),
               "--overwrite"]
    if ray_address:
        cmd += ["--ray-address", ray_address]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    with (run_dir / "log.txt").open("a" if resumable else "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc in (130, 143):
        raise KeyboardInterrupt
    if rc == 0 and (run_dir / "summary.json").is_file():
        final = json.loads((run_dir / "summary.json").read_text())["final"]
        return True, f"acc {final['clean_acc']:.4f} asr {final['asr']:.4f}"
    return False, f"exit {rc}: {error_line(run_dir / 'log.txt')}"


class SweepClock:
    """Runs done / total and the ETA: the mean time of this invocation's runs times those left, over `jobs`."""

    def __init__(self, todo: int, jobs: int, done: int = 0) -> None:
        self.todo, self.jobs, self.done_before = todo, jobs, done
        self.seconds: list[float] = []

    def finished(self, seconds: float) -> str:
        """Count a finished run; `runs 5/26 done, eta 12m30s`."""
        self.seconds.append(seconds)
        left = self.todo - len(self.seconds)
        eta = sum(self.seconds) / len(self.seconds) * left / self.jobs
        text = f"runs {self.done_before + len(self.seconds)}/{self.done_before + self.todo} done"
        return text + (f", eta {duration(eta)}" if left else "")


def run_sweep(sweep: Sweep, sweep_dir: Path, ray_address: str | None = None, jobs: int = 1,
              echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every unfinished point (grid order, `jobs` at a time), then write the report; returns the result rows.

    With jobs > 1 the runs share the machine, so their timings (and the cost table) are not comparable.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs: {jobs} must be at least 1")
    check_finished(sweep, sweep_dir)
    total = len(sweep.points)
    todo = [(i, p) for i, p in enumerate(sweep.points, 1) if finished_config(sweep_dir / "runs" / p.name) is None]
    check_points([p for _, p in todo], ray_address)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(sweep.spec, sort_keys=False))
    to_run = {i for i, _ in todo}
    for i, point in enumerate(sweep.points, 1):
        if i not in to_run:
            echo(f"[{i}/{total}] {point.name}: finished before, skipped")
    lock = threading.Lock()
    clock = SweepClock(len(todo), jobs, done=total - len(todo))

    def task(i: int, point: Point) -> None:
        with lock:
            echo(f"[{i}/{total}] {point.name}: running")
        start = time.time()
        ok, outcome = run_point(point, sweep_dir / "runs" / point.name, ray_address)
        with lock:
            seconds = time.time() - start
            echo(f"[{i}/{total}] {point.name}: {'done' if ok else 'FAILED'} in {seconds:.1f}s, {outcome} | "
                 f"{clock.finished(seconds)}")

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        for future in as_completed([pool.submit(task, i, p) for i, p in todo]):
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        rows = write_report(sweep, sweep_dir)
    return rows
