"""Starting a run on Flower's Simulation Runtime with Ray: quiet environment, resource checks, a watchdog.

Resource problems fail before Ray starts actors, and a watchdog ends the process if a round stalls
(Flower would otherwise wait forever). This module imports neither flwr nor ray at import time, so
`quiet_environment()` can run before either reads its settings.
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

from flip_fl.config import ConfigError, ResourcesConfig

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "GRPC_VERBOSITY": "ERROR",
}


class SimulationError(RuntimeError):
    """A runtime failure of the simulation (exit code 1), as opposed to a bad config (exit code 2)."""


def quiet_environment() -> None:
    """Turn off Flower's telemetry and update check and Ray's usage stats and log noise (unless set already).

    Call it before flwr is first imported in the process: flwr reads FLWR_TELEMETRY_ENABLED once, at
    import (the command line does). `init_ray` calls it again before Ray is imported and started.
    """
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)


@dataclass
class Watchdog:
    """Ends the process with a clear message when no progress is seen for `limit` seconds."""

    limit: float
    last: float = field(default_factory=time.time)
    stopped: threading.Event = field(default_factory=threading.Event)

    def beat(self) -> None:
        """Record progress (a finished round)."""
        self.last = time.time()

    def start(self) -> None:
        """Watch in a daemon thread."""
        threading.Thread(target=self._watch, daemon=True, name="flipfl-watchdog").start()

    def stop(self) -> None:
        """Stop watching."""
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(1.0):
            if time.time() - self.last > self.limit:
                print(f"error: no progress for {self.limit:.0f}s (resources.round_timeout plus a grace period); "
                      "the Ray actors may not have started. Aborting.", file=sys.stderr, flush=True)
                os._exit(1)


def check_local_resources(resources: ResourcesConfig, address: str | None) -> None:
    """Before Ray starts a local cluster: one client actor must fit on this machine (CPUs, a GPU if asked)."""
    if address:
        return  # an existing cluster: `init_ray` checks what it has
    cpus = os.cpu_count() or 1
    if resources.num_cpus > cpus:
        raise ConfigError(f"resources.num_cpus: each client asks for {resources.num_cpus:g} CPUs but this machine "
                          f"has {cpus}; lower it or join a cluster with --ray-address")
    if resources.num_gpus > 0:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if resources.num_gpus > gpus:
            raise ConfigError(f"resources.num_gpus: each client asks for {resources.num_gpus:g} GPU(s) but this "
                              f"machine has {gpus} that torch can use; lower it or join a cluster with --ray-address")


def init_ray(resources: ResourcesConfig, address: str | None) -> None:
    """Start (or join) Ray, quietly, and check the cluster can host at least one client actor."""
    quiet_environment()
    import ray  # imported when a run starts: heavy, and it reads its RAY_* settings at import

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
    for name, key_path, need in (("CPU", "resources.num_cpus", resources.num_cpus),
                                 ("GPU", "resources.num_gpus", resources.num_gpus)):
        if need > available.get(name, 0.0):
            ray.shutdown()
            raise ConfigError(f"{key_path}: each client asks for {need:g} {name}(s) but the Ray cluster has "
                              f"{available.get(name, 0.0):g}; lower it or add resources")


class ClientFailureLogFilter(logging.Filter):
    """Drops Flower's own report of a failed client (two ERROR records with the full traceback, per client).

    The same failure comes back to the strategy as an error reply, which the run summarises in one line
    per reason and logs in full to errors.log; every other Flower error still reaches the terminal.
    """

    SOURCES = {("vce_api", "worker"), ("raybackend", "process_message")}

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but the per-client failure reports."""
        return (record.module, record.funcName) not in self.SOURCES


def launch(server_app: Any, client_app: Any, num_supernodes: int, resources: ResourcesConfig,
           watchdog: Watchdog) -> None:
    """Run `server_app` and `client_app` on Flower's Simulation Runtime (Ray must be started by `init_ray`).

    Returns when the ServerApp's main function returns; the watchdog runs meanwhile.
    """
    from flwr.simulation import run_simulation  # imported here: it configures logging on import

    flower_log = logging.getLogger("flwr")
    flower_log.setLevel(logging.ERROR)
    quiet_failures = ClientFailureLogFilter()
    flower_log.addFilter(quiet_failures)
    watchdog.start()
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                       backend_config={"client_resources": {"num_cpus": resources.num_cpus,
                                                            "num_gpus": resources.num_gpus}})
    finally:
        watchdog.stop()
        flower_log.removeFilter(quiet_failures)
