"""One experiment end to end, and the ServerApp that runs it under `sim.py` and under `flwr run`.

- `prepare`: everything decided before Flower starts, so bad input fails before Ray does: the output
  directory (fresh, `overwrite`, or `resume` from its checkpoint), data, initial model, evaluator, recorder;
- `execute`: the server loop (`flip_fl.federation.loop.serve`: rounds, per-round records via
  `RoundReporter`, checkpoints) and the end-of-run files (`finish`);
- `app`: the module-level Flower ServerApp (`flip_fl.apps.server_app`). Under `flwr run` its main
  reads the run from Flower's run config (`flip_fl.experiments.run_config`); under `run` it takes the run
  `run` prepared in this process;
- `run(cfg, out_dir)`: what `sim.py --config ...` does: prepare, start Ray on 127.0.0.1, run the ServerApp
  and ClientApp on Flower's in-process Simulation Runtime. It raises ConfigError for bad input (before
  anything starts), SimulationError at runtime and RunInterrupted when `stop` is set.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from flip_fl.config import Config, ConfigError, num_attackers, to_yaml
from flip_fl.config.loading import PROJECT_CONFIGS
from flip_fl.config.sections import DataConfig
from flip_fl.data import ImageDataset, load_datasets, partition
from flip_fl.data.sources import TORCHVISION
from flip_fl.device import torch_device
from flip_fl.errors import one_line
from flip_fl.evaluation.evaluator import GlobalEvaluator, validation_split
from flip_fl.experiments.monitor import RunMonitor
from flip_fl.experiments.plots import plot_run
from flip_fl.experiments.progress import Progress, make_progress
from flip_fl.experiments.results import RUN_FILES, RunRecorder, holds_run
from flip_fl.experiments.round_files import RoundSink, RoundTables, TensorBoardLog, check_tensorboard
from flip_fl.experiments.run_config import app_run
from flip_fl.federation.checkpoint import RunState, UnreadableFile, load_checkpoint, read_torch_file, save_checkpoint
from flip_fl.federation.client import check_client_config, load_client_class
from flip_fl.federation.client_app import app as client_app
from flip_fl.federation.loop import RunInterrupted, ServerJob, serve
from flip_fl.federation.protocol import shared_config
from flip_fl.federation.rounds import round_fields
from flip_fl.federation.runtime import (
    SimulationError,
    check_local_resources,
    init_ray,
    launch,
    reap,
    stop_client_actors,
)
from flip_fl.models import build_model
from strategies import build_strategy, evaluation_set

SWEEP_THRESHOLDS = [round(0.05 * i, 2) for i in range(20)]


def check_client_classes(cfg: Config) -> None:
    """Import every configured client class now, so a bad path is a config error before Ray starts."""
    roles = [("roles.benign", cfg.roles.benign)]
    if num_attackers(cfg) > 0:
        roles.append(("roles.malicious", cfg.roles.malicious))
    for key_path, dotted in roles:
        check_client_config(load_client_class(dotted, key_path), cfg, key_path)


def commented_commands(text: str) -> list[str]:
    """The `python sim.py ...` commands in a config file's comments (continued lines joined, trailing comments cut)."""
    commands: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        body = line.strip()
        if not body.startswith("#"):
            current = None
            continue
        body = body.lstrip("#").strip()
        if current is None and body.startswith("python sim.py "):
            current = []
            commands.append("")
        if current is None:
            continue
        continued = body.endswith("\\")
        current.append(body.rstrip("\\").split(" # ")[0].strip())
        commands[-1] = " ".join(" ".join(current).split())
        if not continued:
            current = None
    return commands


def maker_command(path: Path) -> str | None:
    """The command that writes `path`, when it is the final model of a run a project config shows how to make.

    The project's configs name their checkpoints `runs/<name>/final_model.pt` and show in their comments the
    `python sim.py ... --output-dir runs/<name>` that writes one; else `configs/<name>.yaml` itself makes it.
    """
    if path.name != "final_model.pt" or not PROJECT_CONFIGS.is_dir():
        return None
    run_dir = path.parent
    for config in sorted(PROJECT_CONFIGS.rglob("*.yaml")):
        for command in commented_commands(config.read_text(errors="replace")):
            words = command.split()
            if "--output-dir" in words[:-1] and Path(words[words.index("--output-dir") + 1]) == run_dir:
                return command
    if (PROJECT_CONFIGS / f"{run_dir.name}.yaml").is_file():
        return f"python sim.py --config configs/{run_dir.name}.yaml --output-dir {run_dir}"
    return None


def read_state_file(path: Path, key_path: str) -> dict[str, torch.Tensor]:
    """A state_dict (names -> tensors) from `path`, loaded tensors-only; every problem is a ConfigError.

    `torch.load(weights_only=True)` refuses pickled Python objects (code could run); its advice to load
    with weights_only=False is not repeated. A missing checkpoint of a project config names the command that
    makes it.
    """
    if not path.exists():
        command = maker_command(path)
        hint = f"; make it with: {command}" if command else (
            f"; a finished run with --output-dir {path.parent} writes it" if path.name == "final_model.pt" else "")
        raise ConfigError(f"{key_path}: file not found: {path}{hint}")
    if not path.is_file():
        raise ConfigError(f"{key_path}: {path} is not a regular file")
    try:
        state = read_torch_file(path)
    except UnreadableFile as err:
        if err.refused:
            pickled = "holds a pickled" in err.reason
            hint = "; save a state_dict: torch.save(model.state_dict(), path)" if pickled else ""
            raise ConfigError(f"{key_path}: {path} is not a tensors-only PyTorch file; refused, nothing in it was run "
                              f"({err.reason}){hint}") from None
        what = "is a damaged or truncated PyTorch file" if err.damaged else "is not a PyTorch file"
        raise ConfigError(f"{key_path}: {path} {what} ({err.reason})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ConfigError(f"{key_path}: {path} holds a {type(state).__name__}, not a state_dict of named tensors "
                          "(save one with torch.save(model.state_dict(), path))")
    return state


def load_initial_state(cfg: Config, model: torch.nn.Module) -> None:
    """Load `server.initial_model` into `model`: tensors only, matching the model, finite."""
    path = Path(cfg.server.initial_model or "")
    state = read_state_file(path, "server.initial_model")
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"server.initial_model: {path} does not fit model.name={cfg.model.name} "
                          f"({one_line(err, 100)})") from None
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ConfigError(f"server.initial_model: {path} has non-finite values (NaN or inf) in {name!r}")


def check_data_files(cfg: Config) -> None:
    """A torchvision dataset's folder must exist under data.root (unless data.download): checked before loading."""
    spec = TORCHVISION.get(cfg.data.name)
    if spec is None or cfg.data.download:
        return
    expected = Path(cfg.data.root).resolve() / spec.folder
    if not expected.is_dir():
        raise ConfigError(f"data.root: no {cfg.data.name} files found at {expected}; copy the dataset there or set "
                          "data.download: true on a machine with internet access")


def check_inputs(cfg: Config, ray_address: str | None = None) -> None:
    """Every check that needs no data: client classes, resources, TensorBoard, data files, the initial model file.

    What `prepare` checks first, and what a sweep checks for every point before its first run.
    """
    check_client_classes(cfg)
    check_local_resources(cfg.resources, ray_address)
    if cfg.results.tensorboard:
        check_tensorboard()
    check_data_files(cfg)
    if cfg.server.initial_model:
        read_state_file(Path(cfg.server.initial_model), "server.initial_model")


def loading_data(cfg: Config) -> str:
    """The `loading data` phase line; it says when data.root is set but not used (offline datasets)."""
    unused = cfg.data.name not in TORCHVISION and cfg.data.root != DataConfig().root
    return f"loading data: {cfg.data.name}" + (f" (data.root={cfg.data.root} is not used: {cfg.data.name} data "
                                               "does not come from files)" if unused else "")


def check_resumed_model(resume_from: RunState, model: torch.nn.Module, out_dir: Path) -> None:
    """The checkpoint's global model must have the model's tensors, names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in resume_from.global_state.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        raise ConfigError(f"--resume: {out_dir / 'checkpoint.pt'}: damaged: its global model does not fit the "
                          f"config's model ({wrong[0]!r})")


def check_partitions(cfg: Config, train: ImageDataset) -> None:
    """Every client must get data: the partition is drawn now, before Ray, not in every client."""
    sizes = [len(p) for p in partition(cfg, train)]
    if min(sizes) < 1:
        raise ConfigError(f"federation.num_clients: {sizes.count(0)} of {len(sizes)} clients get no data from the "
                          f"{len(train)} training images; use fewer clients")


@dataclass
class RoundReporter:
    """Evaluates the global model after every round and appends the round's line to metrics.jsonl."""

    cfg: Config
    model: torch.nn.Module
    evaluator: GlobalEvaluator
    recorder: RunRecorder
    progress: Progress

    def __call__(self, strategy: Any, server_round: int, arrays: ArrayRecord) -> None:
        """Evaluate `arrays` (the global model after `server_round`) and record the round."""
        entered = time.time()
        self.model.load_state_dict(arrays.to_torch_state_dict())
        metrics = self.evaluator.evaluate(self.model)
        record = strategy.rounds.pop(server_round, None)  # recorded once: per-round memory stays flat
        started = record.started if record is not None else entered
        row = {"round": server_round, "threshold": self.cfg.defense.threshold, **metrics, **round_fields(record),
               "seconds": time.time() - started}
        self.progress.round_finished(self.recorder.record_round(row))


def open_run_dir(cfg: Config, out_dir: Path, resume: bool, overwrite: bool) -> RunState | None:
    """Check the output directory can take this run; returns the checkpoint a resumed run continues from.

    A directory that holds a run is never overwritten unless `overwrite` (which removes the run's files);
    `resume` needs the run's config.yaml and continues from its checkpoint (from the start without one).
    """
    if resume:
        if not (out_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume: {out_dir} holds no run (no config.yaml)")
        try:
            loaded = load_checkpoint(out_dir)
        except ValueError as err:
            raise ConfigError(f"--resume: {err}") from None
        if loaded is not None and loaded[1] != to_yaml(cfg):
            raise ConfigError(f"--resume: {out_dir}/checkpoint.pt was written under another config than its "
                              "config.yaml; start over with --overwrite")
        return loaded[0] if loaded is not None else None
    if holds_run(out_dir):
        if not overwrite:
            raise ConfigError(f"--output-dir: {out_dir} already holds a run; continue it with --resume {out_dir} "
                              "or start over with --overwrite")
        for name in RUN_FILES:
            path = out_dir / name
            if path.is_dir():
                for child in sorted(path.rglob("*"), reverse=True):
                    child.rmdir() if child.is_dir() else child.unlink()
                path.rmdir()
            elif path.exists():
                path.unlink()
    return None


@dataclass
class PreparedRun:
    """A run ready to go: its config and directory, model, evaluators, recorder, display and starting point."""

    cfg: Config
    out_dir: Path
    model: torch.nn.Module
    evaluator: GlobalEvaluator
    validation: GlobalEvaluator | None
    recorder: RunRecorder
    progress: Progress
    initial_state: dict[str, np.ndarray]
    resume_from: RunState | None
    stop: threading.Event = field(default_factory=threading.Event)
    client_pids: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def prepare(cfg: Config, out_dir: Path, *, resume: bool = False, overwrite: bool = False,
            progress: Progress | None = None, ray_address: str | None = None,
            stop: threading.Event | None = None) -> PreparedRun:
    """Everything a run needs before Flower starts; bad input raises ConfigError here."""
    started = time.monotonic()
    progress = progress if progress is not None else Progress()
    check_inputs(cfg, ray_address)
    resume_from = open_run_dir(cfg, out_dir, resume=True, overwrite=False) if resume else None  # reads only
    progress.phase(loading_data(cfg))
    train, test = load_datasets(cfg)
    check_partitions(cfg, train)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, train)
    if cfg.server.initial_model:
        load_initial_state(cfg, model)
    if resume_from is not None:
        check_resumed_model(resume_from, model, out_dir)
    initial_state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    device = torch_device(cfg.resources.num_gpus)
    validation, test = validation_split(cfg, evaluation_set(cfg, test))
    if not resume:
        open_run_dir(cfg, out_dir, resume, overwrite)  # after every input check: nothing written before
    resume_round = None if not resume else (resume_from.server_round if resume_from is not None else -1)
    sinks: list[RoundSink] = [RoundTables(out_dir, resume_round)]
    if cfg.results.tensorboard:
        sinks.append(TensorBoardLog(out_dir / "tensorboard"))
    recorder = RunRecorder(out_dir, cfg, resume_round=resume_round, sinks=sinks)
    return PreparedRun(cfg, out_dir, model, GlobalEvaluator(cfg, test, device),
                       GlobalEvaluator(cfg, validation, device) if validation else None, recorder, progress,
                       initial_state, resume_from, stop if stop is not None else threading.Event(),
                       timings={"prepare": time.monotonic() - started})


def execute(grid: Grid, run: PreparedRun) -> dict[str, Any]:
    """Play the rounds left on `grid` and write the run's final files; returns the summary.

    The client actors are ended when the loop ends (their process ids go to `run.client_pids`).
    """
    cfg, out_dir = run.cfg, run.out_dir
    shared = shared_config(to_yaml(cfg), str((out_dir / "client_state").resolve()))
    config_yaml = to_yaml(cfg)
    job = ServerJob(num_clients=cfg.federation.num_clients, num_rounds=cfg.federation.num_rounds,
                    round_timeout=cfg.resources.round_timeout, initial_state=run.initial_state,
                    resume_from=run.resume_from,
                    build_strategy=lambda partitions: build_strategy(cfg, partitions, shared),
                    on_round=RoundReporter(cfg, run.model, run.evaluator, run.recorder, run.progress),
                    save=lambda state: save_checkpoint(out_dir, state, config_yaml),
                    checkpoint_every=cfg.checkpoint.every, stop=run.stop,
                    release=lambda: run.client_pids.extend(stop_client_actors()), timings=run.timings,
                    observer=RunMonitor(run.progress, out_dir))
    try:
        final = serve(grid, job)
        return finish(run, {k: torch.from_numpy(v) for k, v in final.global_state.items()})
    finally:
        run.recorder.close()


def finish(run: PreparedRun, final_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The end-of-run files: final model, threshold sweep, curves, summary (written last: it marks a finished run).

    The summary's `timings` say where the run's seconds went (prepare, ray_start, startup_query, rounds,
    end_files); `finished_at` (Unix time) lets a caller measure what followed (shutting Flower and Ray down).
    """
    started = time.monotonic()
    run.progress.phase("final model: threshold sweep and plots")
    run.recorder.save_model(final_state)
    run.model.load_state_dict(final_state)
    sweeps = [("test", run.evaluator)] + ([("validation", run.validation)] if run.validation else [])
    run.recorder.write_csv("threshold_sweep.csv", [{"split": split, **row} for split, ev in sweeps
                                                   for row in ev.sweep(run.model, SWEEP_THRESHOLDS)])
    plot_run(run.out_dir)
    timings = {**run.timings, "end_files": time.monotonic() - started}
    return run.recorder.write_summary({"output_dir": str(run.out_dir),
                                       "timings": {k: round(v, 3) for k, v in timings.items()},
                                       "finished_at": time.time()})


@dataclass
class _LocalRun:
    """A run `run` hands to the ServerApp in this process, and what the ServerApp hands back."""

    prepared: PreparedRun
    summary: dict[str, Any] | None = None
    error: BaseException | None = None


_local_runs: list[_LocalRun] = []
"""The run `run` is launching (Flower's in-process runtime cannot pass a run config to the ServerApp)."""

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp: the run `run` prepared in this process, or under `flwr run` the one its run config names."""
    if _local_runs:
        local = _local_runs[0]
        try:
            local.summary = execute(grid, local.prepared)
        except BaseException as err:  # handed to `run` in the main thread: this thread must not die silently
            local.error = err
        return
    logging.getLogger("flwr").setLevel(logging.WARNING)  # as under sim.py: no per-round INFO lines from FedAvg
    request = app_run(context.run_config)
    print(f"flip-fl: run directory {request.out_dir}", flush=True)
    progress = make_progress(request.cfg.federation.num_rounds, quiet=True)  # plain lines in Flower's log
    try:
        execute(grid, prepare(request.cfg, request.out_dir, resume=request.resume, overwrite=request.overwrite,
                              progress=progress))
    finally:
        progress.close()


def run(cfg: Config, out_dir: Path, ray_address: str | None = None, echo: bool = True, *, quiet: bool = False,
        resume: bool = False, overwrite: bool = False, stop: threading.Event | None = None) -> dict[str, Any]:
    """Run the simulation described by `cfg` into `out_dir` (see the module docstring); returns the summary.

    `echo`: show progress (a live display in a terminal; plain lines when piped or `quiet`).
    """
    progress = make_progress(cfg.federation.num_rounds, quiet) if echo else Progress()
    try:
        prepared = prepare(cfg, out_dir, resume=resume, overwrite=overwrite, progress=progress,
                           ray_address=ray_address, stop=stop)
        if prepared.stop.is_set():
            raise RunInterrupted(prepared.resume_from.server_round if prepared.resume_from else -1)
        return run_local(prepared, ray_address)
    finally:
        progress.close()


def run_local(prepared: PreparedRun, ray_address: str | None) -> dict[str, Any]:
    """Start Ray (or join `ray_address`) and run the ServerApp and ClientApp on the in-process runtime."""
    cfg = prepared.cfg
    started = time.monotonic()
    prepared.progress.phase(f"starting Ray ({cfg.federation.num_clients} clients, {cfg.resources.num_cpus:g} CPU "
                            "each)")
    init_ray(cfg.resources, ray_address)
    prepared.timings["ray_start"] = time.monotonic() - started
    local = _LocalRun(prepared)
    _local_runs[:] = [local]
    try:
        launch(app, client_app, cfg.federation.num_clients, cfg.resources)
    finally:
        _local_runs.clear()
        if ray_address is None:
            reap(prepared.client_pids)
    if local.error is not None:
        if isinstance(local.error, (ConfigError, SimulationError, RunInterrupted)):
            raise local.error
        raise SimulationError(f"{type(local.error).__name__}: {local.error}") from local.error
    if local.summary is None:
        raise SimulationError("the simulation ended without a result (see the log above)")
    return local.summary
