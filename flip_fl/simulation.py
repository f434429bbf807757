"""Runs one configured experiment through Flower's Simulation Runtime on Ray.

The ServerApp runs in a thread of this process: it maps nodes to partitions with a QUERY round,
runs the configured strategy, evaluates the global model after every round and appends each
round's metrics to the run directory as it finishes. Resource problems fail before Ray starts
actors, and a watchdog ends the process if a round stalls (Flower would otherwise wait forever).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "GRPC_VERBOSITY": "ERROR",
}
for _name, _value in QUIET_ENV.items():
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from flip_fl.client import load_client_class  # noqa: E402
from flip_fl.config import Config, num_attackers, to_yaml  # noqa: E402
from flip_fl.data import load_datasets  # noqa: E402
from flip_fl.evaluation import GlobalEvaluator  # noqa: E402
from flip_fl.models import build_model  # noqa: E402
from flip_fl.plots import plot_run  # noqa: E402
from flip_fl.results import RunRecorder  # noqa: E402
from flip_fl.schema import ConfigError  # noqa: E402

SWEEP_THRESHOLDS = [round(0.05 * i, 2) for i in range(20)]


class SimulationError(RuntimeError):
    """A runtime failure of the simulation (exit code 1), as opposed to a bad config (exit code 2)."""


@dataclass
class RunOutcome:
    """What the ServerApp thread hands back to the caller."""

    final_state: dict[str, torch.Tensor] | None = None
    error: BaseException | None = None
    strategy: Any = None


@dataclass
class Watchdog:
    """Ends the process with a clear message when no progress is seen for `limit` seconds."""

    limit: float
    last: float = field(default_factory=time.time)
    stopped: threading.Event = field(default_factory=threading.Event)

    def beat(self) -> None:
        self.last = time.time()

    def start(self) -> None:
        threading.Thread(target=self._watch, daemon=True, name="flipfl-watchdog").start()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(1.0):
            if time.time() - self.last > self.limit:
                print(f"error: no progress for {self.limit:.0f}s (resources.round_timeout plus a grace period); "
                      "the Ray actors may not have started. Aborting.", file=sys.stderr, flush=True)
                os._exit(1)


def check_client_classes(cfg: Config) -> None:
    """Import every configured client class now, so a bad path is a config error before Ray starts."""
    roles = [("clients.benign", cfg.clients.benign)]
    if num_attackers(cfg) > 0:
        roles.append(("attack.client", cfg.attack.client))
    for key_path, dotted in roles:
        cls = load_client_class(dotted, key_path)
        check = getattr(cls, "check_config", None)
        if check is not None:
            check(cfg)


def load_initial_state(cfg: Config, model: torch.nn.Module) -> None:
    """Load `server.initial_model` into `model` (weights only), with config errors for bad files."""
    path = Path(cfg.server.initial_model or "")
    if not path.is_file():
        raise ConfigError(f"server.initial_model: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"server.initial_model: {path} does not fit model.name={cfg.model.name} ({first})") from None


def init_ray(cfg: Config, address: str | None) -> None:
    """Start (or join) Ray and check the cluster can host at least one client actor."""
    import ray

    paths = [str(Path.cwd())] + [p for p in sys.path if p and Path(p).is_dir() and "site-packages" not in p]
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), **QUIET_ENV}}
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False,
                              "include_dashboard": False, "runtime_env": runtime_env}
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(address=address, **kwargs) if address else ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SimulationError(f"cannot start or reach Ray{' at ' + address if address else ''}: {err}") from None
    available = ray.cluster_resources()
    res = cfg.resources
    for name, key_path, need in (("CPU", "resources.num_cpus", res.num_cpus), ("GPU", "resources.num_gpus", res.num_gpus)):
        if need > available.get(name, 0.0):
            ray.shutdown()
            raise ConfigError(f"{key_path}: each client asks for {need:g} {name}(s) but the Ray cluster has "
                              f"{available.get(name, 0.0):g}; lower it or add resources")


def discover_partitions(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """node id -> partition id, asked of every node with a QUERY message."""
    deadline = time.time() + timeout
    while len(node_ids := list(grid.get_node_ids())) < num_clients:
        if time.time() > deadline:
            raise SimulationError(f"only {len(node_ids)} of {num_clients} clients connected")
        time.sleep(0.1)
    messages = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    mapping = {m.metadata.src_node_id: int(m.content["info"]["partition-id"]) for m in replies if not m.has_error()}
    if len(mapping) != num_clients:
        errors = "; ".join(m.error.reason for m in replies if m.has_error())[:500]
        raise SimulationError(f"only {len(mapping)} of {num_clients} clients answered the start-up query. {errors}")
    return mapping


def round_fields(strategy: Any, server_round: int) -> dict[str, Any]:
    """The client-side facts of a round for its metrics line (empty lists for round 0)."""
    record = strategy.rounds.get(server_round)
    if record is None:
        return {"sampled": [], "malicious": [], "attacking": [], "failures": 0}
    metrics = record.client_metrics
    keys = sorted({k for m in metrics.values() for k in m})
    means = {f"client_{k}": float(np.mean([m[k] for m in metrics.values() if k in m])) for k in keys}
    return {"sampled": record.sampled, "malicious": record.malicious, "attacking": record.attacking,
            "attack_round": bool(record.attacking), "failures": record.failures, "failed": record.failed,
            "errors": record.errors, **means, "client_metrics": {str(p): m for p, m in sorted(metrics.items())},
            **record.extra}


def run(cfg: Config, out_dir: Path, ray_address: str | None = None, echo: bool = True) -> dict[str, Any]:
    """Run the simulation described by `cfg`, writing results to `out_dir`; returns the summary.

    Raises ConfigError for bad input (before anything starts) and SimulationError at runtime.
    """
    from flwr.simulation import run_simulation  # imported late: it configures logging on import

    from flip_fl.client_app import app as client_app
    from strategies import build_strategy, evaluation_set

    logging.getLogger("flwr").setLevel(logging.ERROR)
    check_client_classes(cfg)
    train, test = load_datasets(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, train)
    if cfg.server.initial_model:
        load_initial_state(cfg, model)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    device = torch.device("cuda" if cfg.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu")
    evaluator = GlobalEvaluator(cfg, evaluation_set(cfg, test), device)
    init_ray(cfg, ray_address)

    recorder = RunRecorder(out_dir, cfg, echo=echo)
    outcome = RunOutcome()
    watchdog = Watchdog(limit=cfg.resources.round_timeout + 120.0)
    base_config = {"flipfl-config": to_yaml(cfg), "workdir": str((out_dir / "client_state").resolve())}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            partitions = discover_partitions(grid, cfg.federation.num_clients, cfg.resources.round_timeout)
            strategy = build_strategy(cfg, partitions, base_config)
            outcome.strategy = strategy
            round_start = {"t": time.time()}

            def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
                model.load_state_dict(arrays.to_torch_state_dict())
                metrics = evaluator.evaluate(model)
                record = strategy.rounds.get(server_round)
                started = record.started if record is not None else round_start["t"]
                row = {"round": server_round, "threshold": cfg.defense.threshold, **metrics,
                       **round_fields(strategy, server_round), "seconds": time.time() - started}
                recorder.record_round(row)
                watchdog.beat()
                return MetricRecord({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

            result = strategy.start(grid, ArrayRecord(initial_state), cfg.federation.num_rounds,
                                    timeout=cfg.resources.round_timeout, evaluate_fn=evaluate,
                                    train_config=ConfigRecord())
            outcome.final_state = result.arrays.to_torch_state_dict()
        except BaseException as err:  # handed to the caller: the ServerApp thread must not die silently
            outcome.error = err

    watchdog.start()
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_clients,
                       backend_config={"client_resources": {"num_cpus": cfg.resources.num_cpus,
                                                            "num_gpus": cfg.resources.num_gpus}})
    finally:
        watchdog.stop()
    if outcome.error is not None:
        if isinstance(outcome.error, (ConfigError, SimulationError)):
            raise outcome.error
        raise SimulationError(f"{type(outcome.error).__name__}: {outcome.error}") from outcome.error
    if outcome.final_state is None:
        raise SimulationError("the simulation ended without a final model (see the log above)")

    recorder.save_model(outcome.final_state)
    model.load_state_dict(outcome.final_state)
    recorder.write_csv("threshold_sweep.csv", evaluator.sweep(model, SWEEP_THRESHOLDS))
    plot_run(out_dir)
    return recorder.write_summary({"output_dir": str(out_dir)})
