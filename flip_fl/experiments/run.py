"""One experiment end to end: data, initial model, evaluator and strategy, the federation, the run's files.

`run(cfg, out_dir)` is what `sim.py --config ...` does; it raises ConfigError for bad input (before
anything starts) and SimulationError at runtime.
"""

from __future__ import annotations

import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord

from flip_fl.config import Config, ConfigError, num_attackers, to_yaml
from flip_fl.data import ImageDataset, load_datasets, partition
from flip_fl.defenses.fltrust import evaluation_set
from flip_fl.device import torch_device
from flip_fl.evaluation.evaluator import GlobalEvaluator, validation_split
from flip_fl.experiments.monitor import RunMonitor
from flip_fl.experiments.plots import plot_run
from flip_fl.experiments.progress import Progress, make_progress
from flip_fl.experiments.results import RunRecorder
from flip_fl.experiments.round_files import RoundSink, RoundTables, TensorBoardLog, check_tensorboard
from flip_fl.federation.client import check_client_config, load_client_class, one_line
from flip_fl.federation.client_app import app as client_app
from flip_fl.federation.protocol import scalar_record, shared_config
from flip_fl.federation.rounds import round_fields
from flip_fl.federation.runtime import SimulationError, Watchdog, check_local_resources, init_ray, launch
from flip_fl.federation.server_app import RunOutcome, ServerJob, server_app
from flip_fl.models import build_model
from strategies import build_strategy

SWEEP_THRESHOLDS = [round(0.05 * i, 2) for i in range(20)]


def check_client_classes(cfg: Config) -> None:
    """Import every configured client class now, so a bad path is a config error before Ray starts."""
    roles = [("clients.benign", cfg.clients.benign)]
    if num_attackers(cfg) > 0:
        roles.append(("attack.client", cfg.attack.client))
    for key_path, dotted in roles:
        check_client_config(load_client_class(dotted, key_path), cfg, key_path)


def read_state_file(path: Path, key_path: str) -> dict[str, torch.Tensor]:
    """A state_dict (names -> tensors) from `path`, loaded tensors-only; every problem is a ConfigError.

    `torch.load(weights_only=True)` refuses pickled Python objects (code could run); its advice to load
    with weights_only=False is not repeated.
    """
    if not path.exists():
        raise ConfigError(f"{key_path}: file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{key_path}: {path} is not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise ConfigError(f"{key_path}: {path} is not a tensors-only PyTorch file; refused, nothing in it was run "
                          f"({one_line(detail, 120)})") from None
    except Exception as err:  # torch.load raises whatever its readers raise on a foreign file
        raise ConfigError(f"{key_path}: {path} is not a PyTorch file ({type(err).__name__}: "
                          f"{one_line(err, 120)})") from None
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
                          f"({one_line(err)})") from None
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ConfigError(f"server.initial_model: {path} has non-finite values (NaN or inf) in {name!r}")


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
    watchdog: Watchdog
    progress: Progress

    def __call__(self, strategy: Any, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Evaluate `arrays` (the global model after `server_round`) and record the round."""
        entered = time.time()
        self.model.load_state_dict(arrays.to_torch_state_dict())
        metrics = self.evaluator.evaluate(self.model)
        record = strategy.rounds.get(server_round)
        started = record.started if record is not None else entered
        row = {"round": server_round, "threshold": self.cfg.defense.threshold, **metrics, **round_fields(record),
               "seconds": time.time() - started}
        self.recorder.record_round(row)
        self.progress.round_finished(self.recorder.rows[-1])
        self.watchdog.beat()
        return scalar_record(metrics)


def run(cfg: Config, out_dir: Path, ray_address: str | None = None, echo: bool = True,
        quiet: bool = False) -> dict[str, Any]:
    """Run the simulation described by `cfg`, writing results to `out_dir`; returns the summary.

    `echo`: show progress (a live display in a terminal; plain lines when piped or `quiet`).
    Raises ConfigError for bad input (before anything starts) and SimulationError at runtime.
    """
    check_client_classes(cfg)
    check_local_resources(cfg.resources, ray_address)
    if cfg.results.tensorboard:
        check_tensorboard()
    progress = make_progress(cfg.federation.num_rounds, quiet) if echo else Progress()
    try:
        return _run(cfg, out_dir, ray_address, progress)
    finally:
        progress.close()


def _run(cfg: Config, out_dir: Path, ray_address: str | None, progress: Progress) -> dict[str, Any]:
    progress.phase(f"loading data: {cfg.data.name}")
    train, test = load_datasets(cfg)
    check_partitions(cfg, train)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, train)
    if cfg.server.initial_model:
        load_initial_state(cfg, model)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    device = torch_device(cfg.resources.num_gpus)
    validation, test = validation_split(cfg, evaluation_set(cfg, test))
    evaluator = GlobalEvaluator(cfg, test, device)
    progress.phase(f"starting Ray ({cfg.federation.num_clients} clients, {cfg.resources.num_cpus:g} CPU each)")
    init_ray(cfg.resources, ray_address)

    out_dir.mkdir(parents=True, exist_ok=True)
    sinks: list[RoundSink] = [RoundTables(out_dir)]
    if cfg.results.tensorboard:
        sinks.append(TensorBoardLog(out_dir / "tensorboard"))
    recorder = RunRecorder(out_dir, cfg, echo=False, sinks=sinks)
    watchdog = Watchdog(limit=cfg.resources.round_timeout + 120.0)
    shared = shared_config(to_yaml(cfg), str((out_dir / "client_state").resolve()))
    job = ServerJob(num_clients=cfg.federation.num_clients, num_rounds=cfg.federation.num_rounds,
                    round_timeout=cfg.resources.round_timeout, initial_state=initial_state,
                    build_strategy=lambda partitions: build_strategy(cfg, partitions, shared),
                    on_round=RoundReporter(cfg, model, evaluator, recorder, watchdog, progress),
                    observer=RunMonitor(progress, out_dir))
    outcome = RunOutcome()
    try:
        launch(server_app(job, outcome), client_app, cfg.federation.num_clients, cfg.resources, watchdog)
    finally:
        recorder.close()
    if outcome.error is not None:
        if isinstance(outcome.error, (ConfigError, SimulationError)):
            raise outcome.error
        raise SimulationError(f"{type(outcome.error).__name__}: {outcome.error}") from outcome.error
    if outcome.final_state is None:
        raise SimulationError("the simulation ended without a final model (see the log above)")

    progress.phase("final model: threshold sweep and plots")
    recorder.save_model(outcome.final_state)
    model.load_state_dict(outcome.final_state)
    sweeps = [("test", evaluator)] + ([("validation", GlobalEvaluator(cfg, validation, device))] if validation else [])
    recorder.write_csv("threshold_sweep.csv", [{"split": split, **row} for split, ev in sweeps
                                               for row in ev.sweep(model, SWEEP_THRESHOLDS)])
    plot_run(out_dir)
    return recorder.write_summary({"output_dir": str(out_dir)})
