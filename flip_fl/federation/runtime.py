"""Starting a run on Flower's Simulation Runtime with Ray: quiet environment, Ray start-up, resource checks.

- A local Ray cluster listens on 127.0.0.1 only (Ray has no authentication); joining `--ray-address` is
  bounded by `resources.ray_connect_timeout`.
- A client's resource request is compared with what one Ray node offers (an actor cannot span nodes), so
  an impossible request fails before any actor is started.
- `stop_client_actors` ends the run's client actors, busy ones included, so Flower's shutdown does not
  wait for a client that is stuck or still training after a stop.

This module imports neither flwr nor ray at import time, so `quiet_environment()` can run before either
reads its settings.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
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
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to 0, Ray takes 127.0.0.1 as the node address, and its GCS, raylet and workers listen there only."""
CLIENT_ACTOR = "ClientAppActor"
"""The class name of Flower's client actors."""


class SimulationError(RuntimeError):
    """A runtime failure of the simulation (exit code 1), as opposed to a bad config (exit code 2)."""


def quiet_environment() -> None:
    """Turn off Flower's telemetry and update check and Ray's usage stats and log noise (unless set already).

    Call it before flwr is first imported in the process: flwr reads FLWR_TELEMETRY_ENABLED once, at
    import (the command line does). `init_ray` calls it again before Ray is imported and started.
    """
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)


def local_ray_environment() -> None:
    """Make a Ray cluster started by this process listen on 127.0.0.1 only (call before Ray starts).

    Ray reads the switch when it is imported, so it is also set on Ray's constants if Ray was imported.
    """
    os.environ[LOCAL_ONLY_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


def check_reachable(address: str, timeout: float) -> None:
    """Fail fast when a `host:port` Ray address refuses connections or does not answer within `timeout`."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # "auto", "ray://..." and the like: left to Ray (still bounded by the connect timeout)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise SimulationError(f"cannot reach Ray at {address}: {err.strerror or err}") from None


def _ray_init(address: str | None, kwargs: dict[str, Any], timeout: float) -> None:
    """`ray.init`, joining `address` within `timeout` seconds (a local start is not bounded)."""
    import ray

    if address is None:
        ray.init(**kwargs)
        return
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            ray.init(address=address, **kwargs)
            outcome.append(None)
        except BaseException as err:  # handed to the caller
            outcome.append(err)

    thread = threading.Thread(target=connect, daemon=True, name="flipfl-ray-connect")
    started = time.monotonic()
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise SimulationError(f"cannot reach Ray at {address}: no answer within {time.monotonic() - started:.0f}s "
                              "(resources.ray_connect_timeout)")
    if outcome[0] is not None:
        raise outcome[0]


def check_node_resources(resources: ResourcesConfig) -> None:
    """Each client's request must fit on one Ray node: it runs in one actor, which cannot span nodes."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
    for name, key_path, need in (("CPU", "resources.num_cpus", resources.num_cpus),
                                 ("GPU", "resources.num_gpus", resources.num_gpus)):
        largest = max((float(n.get(name, 0.0)) for n in nodes), default=0.0)
        if need > largest:
            raise ConfigError(f"{key_path}: each client asks for {need:g} {name}(s) but the largest Ray node has "
                              f"{largest:g}; lower it or add resources")


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
    """Start a local Ray cluster on 127.0.0.1 (or join `address`), quietly, and check a client actor fits a node.

    Ray replaces the driver's SIGTERM handler with one that exits at once; the handler in place before is
    put back, so the command line's clean stop on SIGTERM keeps working.
    """
    quiet_environment()
    if address is None:
        local_ray_environment()
    import ray  # imported when a run starts: heavy, and it reads its RAY_* settings at import

    paths = [str(Path.cwd())] + [p for p in sys.path if p and Path(p).is_dir() and "site-packages" not in p]
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), **QUIET_ENV}}
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False,
                              "include_dashboard": False, "runtime_env": runtime_env}
    if ray.is_initialized():
        ray.shutdown()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main else None
    try:
        if address:
            check_reachable(address, resources.ray_connect_timeout)
        _ray_init(address, kwargs, resources.ray_connect_timeout)
    except (ConnectionError, RuntimeError, ValueError) as err:
        if isinstance(err, SimulationError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SimulationError(f"cannot start or reach Ray{' at ' + address if address else ''}: {first}") from None
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    try:
        check_node_resources(resources)
    except ConfigError:
        ray.shutdown()
        raise


class ClientFailureLogFilter(logging.Filter):
    """Drops Flower's own report of a failed client (two ERROR records with the full traceback, per client).

    The same failure comes back to the strategy as an error reply, which the run summarises in one line
    per reason and logs in full to errors.log; every other Flower error still reaches the terminal.
    """

    SOURCES = {("vce_api", "worker"), ("raybackend", "process_message")}

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but the per-client failure reports."""
        return (record.module, record.funcName) not in self.SOURCES


def stop_client_actors() -> list[int]:
    """Kill this driver's Flower client actors, busy or not; returns their process ids.

    Flower's Simulation Runtime waits for every message an actor is working on before it shuts down (a
    client that never returns would keep the process alive for good), and an actor that is still exiting
    when Ray shuts down lingers for half a minute. Ray has no public way to list actors without its
    dashboard, so this reads the actor table (`ray._private.state`), restricted to this driver's job.
    """
    import ray

    if not ray.is_initialized():
        return []
    from ray._private import state as ray_state

    logging.getLogger("flwr").setLevel(logging.CRITICAL)  # Flower logs each killed actor's task as an error
    job = ray.get_runtime_context().get_job_id()
    core = ray._private.worker.global_worker.core_worker  # type: ignore[attr-defined]
    pids = []
    for actor_id, info in ray_state.actors().items():
        if info.get("JobID") == job and info.get("State") == "ALIVE" and info.get("ActorClassName") == CLIENT_ACTOR:
            ray.kill(core.get_actor_handle(ray.ActorID.from_hex(actor_id)), no_restart=True)
            pids.append(int(info.get("Pid") or 0))
    return [pid for pid in pids if pid > 0]


def reap(pids: list[int], grace: float = 3.0) -> None:
    """Wait up to `grace` seconds for these (local) Ray worker processes to end, then SIGKILL what is left."""
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _is_ray_worker(pid)]
    for pid in alive:
        if _is_ray_worker(pid):
            os.kill(pid, signal.SIGKILL)


def _is_ray_worker(pid: int) -> bool:
    """Whether `pid` is a live Ray worker process (and not a zombie or a reused process id)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and cmdline.startswith(b"ray::")


def launch(server_app: Any, client_app: Any, num_supernodes: int, resources: ResourcesConfig) -> None:
    """Run `server_app` and `client_app` on Flower's in-process Simulation Runtime (Ray started by `init_ray`).

    Returns when the ServerApp's main function has returned and Flower has shut the actors and Ray down.
    """
    from flwr.simulation import run_simulation  # imported here: it configures logging on import

    flower_log = logging.getLogger("flwr")
    flower_log.setLevel(logging.ERROR)
    quiet_failures = ClientFailureLogFilter()
    flower_log.addFilter(quiet_failures)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                       backend_config={"client_resources": {"num_cpus": resources.num_cpus,
                                                            "num_gpus": resources.num_gpus}})
    finally:
        flower_log.removeFilter(quiet_failures)
