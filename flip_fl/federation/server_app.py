"""The ServerApp: maps nodes to partitions, runs the strategy and hands every evaluated round to the caller.

`serve` is the main loop; `server_app` wraps it in a Flower `ServerApp` for the in-process Simulation
Runtime, whose ServerApp runs in a thread of the calling process: the final model or the error goes back
through a `RunOutcome`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from flip_fl.federation.failures import is_out_of_memory, memory_hint, short_reason
from flip_fl.federation.observe import NullObserver, ObservedGrid, RoundObserver
from flip_fl.federation.protocol import read_partition
from flip_fl.federation.runtime import SimulationError

RoundCallback = Callable[[Any, int, ArrayRecord], MetricRecord]


@dataclass
class ServerJob:
    """What the ServerApp needs from the caller.

    The federation's size, the initial model, how to build the strategy once nodes are mapped to
    partitions, and what to do with each evaluated round (strategy, round, arrays).
    """

    num_clients: int
    num_rounds: int
    round_timeout: float
    initial_state: dict[str, torch.Tensor]
    build_strategy: Callable[[dict[int, int]], Any]
    on_round: RoundCallback
    observer: RoundObserver = field(default_factory=NullObserver)


@dataclass
class RunOutcome:
    """What the ServerApp thread hands back to the caller."""

    final_state: dict[str, torch.Tensor] | None = None
    error: BaseException | None = None
    strategy: Any = None


def discover_partitions(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """Node id -> partition id, asked of every node with a QUERY message."""
    deadline = time.time() + timeout
    while len(node_ids := list(grid.get_node_ids())) < num_clients:
        if time.time() > deadline:
            raise SimulationError(f"only {len(node_ids)} of {num_clients} clients connected")
        time.sleep(0.1)
    messages = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    mapping = {m.metadata.src_node_id: read_partition(m.content) for m in replies if not m.has_error()}
    if len(mapping) != num_clients:
        reasons = [m.error.reason or "" for m in replies if m.has_error()]
        counts = Counter(short_reason(r) for r in reasons)
        errors = "; ".join(f"{n}x {reason}" for reason, n in counts.items()) or "no reply"
        memory = [r for r in reasons if is_out_of_memory(r)]
        hint = f". {memory_hint(memory[0])}" if memory else ""
        raise SimulationError(f"only {len(mapping)} of {num_clients} clients answered the start-up query: "
                              f"{errors}{hint}")
    return mapping


def serve(grid: Grid, job: ServerJob, outcome: RunOutcome) -> None:
    """Map nodes to partitions, build the strategy and run all rounds; the final model goes into `outcome`."""
    job.observer.phase(f"connecting {job.num_clients} clients")
    partitions = discover_partitions(grid, job.num_clients, job.round_timeout)
    strategy = job.build_strategy(partitions)
    outcome.strategy = strategy

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        return job.on_round(strategy, server_round, arrays)

    observed = ObservedGrid(grid, strategy, job.observer, job.round_timeout)
    result = strategy.start(observed, ArrayRecord(job.initial_state), job.num_rounds, timeout=job.round_timeout,
                            evaluate_fn=evaluate, train_config=ConfigRecord())
    outcome.final_state = result.arrays.to_torch_state_dict()


def server_app(job: ServerJob, outcome: RunOutcome) -> ServerApp:
    """A ServerApp running `serve`; any exception is handed to the caller in `outcome.error`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            serve(grid, job, outcome)
        except BaseException as err:  # handed to the caller: the ServerApp thread must not die silently
            outcome.error = err

    return app
