"""The server loop: map nodes to partitions, then round after round sample, exchange, aggregate, record, checkpoint.

`serve` is the one loop of every run, whichever launcher started it (`sim.py` on the in-process Simulation
Runtime, or `flwr run`); the ServerApp around it is `flip_fl.experiments.run.app`. It drives the
strategy directly instead of Flower's `Strategy.start` because a run must be able to start at any round
(resume), stop between polls (Ctrl-C, SIGTERM) and give up on clients that do not answer within
`resources.round_timeout` (counted as failures; the run goes on):

- `exchange` pushes a round's messages and polls for replies until all are in, the timeout passes or a
  stop is requested;
- every partition's `ClientState` goes out with its TRAIN message and comes back in the reply; the loop
  keeps them and hands them, with the global model and the strategy's state, to `ServerJob.save`;
- `ServerJob.on_round` evaluates and records each round (round 0 is the initial model).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flip_fl.config import ConfigError
from flip_fl.federation.checkpoint import RunState, restore_rng
from flip_fl.federation.failures import is_out_of_memory, memory_hint, short_reason
from flip_fl.federation.observe import NullObserver, RoundObserver, RoundWatch
from flip_fl.federation.protocol import ClientState, read_partition, take_state, write_state
from flip_fl.federation.runtime import SimulationError

POLL_SECONDS = 0.02
"""How often `exchange` asks for replies (Flower's own loop sleeps 0.1 s)."""
STARTUP_SECONDS = 300.0
"""The least time the start-up query may take (it includes starting the client actors)."""
NODE_SETTLE_SECONDS = 1.0
"""How long the node count must stay unchanged before it is compared with federation.num_clients."""


class RunInterrupted(Exception):  # noqa: N818 (not an error: the run was asked to stop)
    """A stop was requested; rounds up to `server_round` are recorded and checkpointed."""

    def __init__(self, server_round: int) -> None:
        super().__init__(f"interrupted after round {server_round}")
        self.server_round = server_round


class _StopRequested(Exception):  # noqa: N818
    """Raised inside the loop when the stop event is seen."""


@dataclass
class ServerJob:
    """What the loop needs from the run.

    Args:
        num_clients: federation.num_clients (the federation must have exactly this many nodes).
        num_rounds: the last round.
        round_timeout: seconds to wait for a round's replies.
        initial_state: the global model of a fresh run.
        resume_from: the checkpoint a resumed run continues from (None: a fresh run).
        build_strategy: the strategy for a node id -> partition id map.
        on_round: evaluates and records a round: (strategy, round, global arrays).
        save: writes a checkpoint.
        checkpoint_every: save after every k-th round (and after the last one, and on a stop).
        stop: set to stop at the next poll; the loop saves a checkpoint and raises RunInterrupted.
        release: called when the loop ends, however it ends, to end the clients at once: the runtime's
            shutdown would otherwise wait for a client that is stuck or still training after a stop.
        timings: filled with the seconds spent in the start-up query and in the rounds.
        observer: told of start-up phases, each reply as it arrives and each round's failures.
    """

    num_clients: int
    num_rounds: int
    round_timeout: float
    initial_state: dict[str, np.ndarray]
    resume_from: RunState | None
    build_strategy: Callable[[dict[int, int]], Any]
    on_round: Callable[[Any, int, ArrayRecord], Any]
    save: Callable[[RunState], object]
    checkpoint_every: int = 1
    stop: threading.Event = field(default_factory=threading.Event)
    release: Callable[[], object] = lambda: None
    timings: dict[str, float] = field(default_factory=dict)
    observer: RoundObserver = field(default_factory=NullObserver)


def wait_for_nodes(grid: Grid, num_clients: int, timeout: float, stop: threading.Event) -> list[int]:
    """The federation's node ids, once their number has settled; it must equal `num_clients`."""
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    settled_at = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) != len(seen):
            seen, settled_at = nodes, time.monotonic()
        if seen and (len(seen) == num_clients or time.monotonic() - settled_at >= NODE_SETTLE_SECONDS):
            break
        if time.monotonic() > deadline:
            break
        if stop.wait(POLL_SECONDS):
            raise _StopRequested
    if len(seen) != num_clients:
        raise ConfigError(f"federation.num_clients: the config has {num_clients} clients but the federation has "
                          f"{len(seen)} nodes; run it with --federation-config \"num-supernodes={num_clients}\" "
                          "(flwr run) or change federation.num_clients")
    return seen


def exchange(grid: Grid, messages: Iterable[Message], timeout: float, stop: threading.Event,
             on_replies: Callable[[list[Message]], object] = lambda replies: None) -> tuple[list[Message], int]:
    """Send `messages` and collect the replies that come within `timeout` seconds; (replies, unanswered).

    `on_replies` is told of each batch of replies as it arrives (the live display).
    """
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        if got:
            on_replies(got)
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        if stop.wait(POLL_SECONDS):
            raise _StopRequested
    return replies, len(pending)


def discover_partitions(grid: Grid, num_clients: int, timeout: float, stop: threading.Event) -> dict[int, int]:
    """Node id -> partition id, asked of every node with a QUERY message (within `timeout`, at least 300 s)."""
    timeout = max(timeout, STARTUP_SECONDS)
    nodes = wait_for_nodes(grid, num_clients, timeout, stop)
    messages = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    replies, _ = exchange(grid, messages, timeout, stop)
    mapping = {m.metadata.src_node_id: read_partition(m.content) for m in replies if not m.has_error()}
    if len(mapping) != num_clients:
        reasons = [m.error.reason or "" for m in replies if m.has_error()]
        counts = Counter(short_reason(r) for r in reasons)
        errors = "; ".join(f"{n}x {reason}" for reason, n in counts.items()) or "no reply"
        memory = [r for r in reasons if is_out_of_memory(r)]
        hint = f". {memory_hint(memory[0])}" if memory else ""
        raise SimulationError(f"only {len(mapping)} of {num_clients} clients answered the start-up query within "
                              f"{timeout:.0f}s: {errors}{hint}")
    return mapping


@dataclass
class _Loop:
    """The live state of `serve`: what a checkpoint is made of."""

    grid: Grid
    job: ServerJob
    partitions: dict[int, int]
    strategy: Any
    arrays: ArrayRecord
    clients: dict[int, ClientState]
    done: int = -1
    saved: int = -1

    def snapshot(self) -> RunState:
        return RunState(self.done, {k: v.numpy() for k, v in self.arrays.items()}, self.strategy.state_dict(),
                        dict(self.clients))

    def save(self) -> None:
        if self.saved != self.done:
            self.job.save(self.snapshot())
            self.saved = self.done

    def play_round(self, server_round: int) -> None:
        """One round: sample and send (with each partition's state), collect, aggregate, record."""
        job, partitions = self.job, self.partitions
        messages = list(self.strategy.configure_train(server_round, self.arrays, ConfigRecord(), self.grid))
        for m in messages:
            write_state(m.content, self.clients.get(partitions[m.metadata.dst_node_id], ClientState()))
        watch = RoundWatch(job.observer, server_round, self.strategy.rounds[server_round], self.strategy.partition_of)

        def arrived(replies: list[Message]) -> None:
            for reply in replies:  # the state goes back to the loop, never to the strategy
                state = None if reply.has_error() else take_state(reply.content)
                if state is not None and reply.metadata.src_node_id in partitions:
                    self.clients[partitions[reply.metadata.src_node_id]] = state
            watch.arrived(replies)

        replies, _ = exchange(self.grid, messages, job.round_timeout, job.stop, on_replies=arrived)
        try:
            aggregate, _ = self.strategy.aggregate_train(server_round, replies)
        finally:
            watch.done()  # the failures the strategy recorded, also when too few replies end the run
        if aggregate is not None:
            self.arrays = aggregate
        job.on_round(self.strategy, server_round, self.arrays)
        self.done = server_round


def serve(grid: Grid, job: ServerJob) -> RunState:
    """Run the rounds left (all of them, or those after `job.resume_from`); returns the final RunState.

    Raises RunInterrupted when `job.stop` is set (after saving a checkpoint of the last finished round),
    ConfigError when the federation does not match the config, and whatever the strategy raises.
    """
    loop: _Loop | None = None
    started = time.monotonic()
    try:
        job.observer.phase(f"connecting {job.num_clients} clients")
        partitions = discover_partitions(grid, job.num_clients, job.round_timeout, job.stop)
        job.timings["startup_query"] = time.monotonic() - started
        start = job.resume_from
        strategy = job.build_strategy(partitions)
        if start is not None:
            strategy.load_state_dict(start.strategy)
            restore_rng(start.rng)
        arrays = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in
                              (start.global_state if start else job.initial_state).items()})
        loop = _Loop(grid, job, partitions, strategy, arrays, dict(start.clients) if start else {})
        if start is None:
            job.on_round(strategy, 0, arrays)
            loop.done = 0
            loop.save()
        else:
            loop.done = loop.saved = start.server_round
        rounds_started = time.monotonic()
        for server_round in range(loop.done + 1, job.num_rounds + 1):
            loop.play_round(server_round)
            if server_round % job.checkpoint_every == 0 or server_round == job.num_rounds:
                loop.save()
            if job.stop.is_set():
                raise _StopRequested
        loop.save()
        job.timings["rounds"] = time.monotonic() - rounds_started
        return loop.snapshot()
    except _StopRequested:
        if loop is None or loop.done < 0:
            raise RunInterrupted(job.resume_from.server_round if job.resume_from else -1) from None
        loop.save()
        raise RunInterrupted(loop.done) from None
    finally:
        job.release()
