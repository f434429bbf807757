"""Watching a run from the server side while it goes: start-up phases, rounds, each client's reply as it arrives.

Flower's `Grid.send_and_receive` returns only when every reply of a round is in, so a round of slow clients
(FLIP inverts triggers for minutes on a CPU) shows nothing until it ends. `ObservedGrid` wraps the grid a
strategy runs on: it sends and polls like Flower's in-memory grid, and tells a `RoundObserver` about each
reply the moment it arrives, and about the round's failures (error replies, replies the strategy will
reject as malformed — `protocol.check_fit_reply` — and clients that never answered) when the round's
replies are complete.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from flip_fl.federation import protocol
from flip_fl.federation.failures import no_reply_reason
from flip_fl.federation.rounds import RoundRecord

POLL_SECONDS = 0.1


class RoundObserver(Protocol):
    """What the server side reports while a run goes (implemented in `flip_fl.experiments.monitor`)."""

    def phase(self, text: str) -> None:
        """A start-up phase begins (`connecting 20 clients`)."""

    def round_started(self, server_round: int, sampled: Sequence[int], malicious: Sequence[int]) -> None:
        """The round's train messages are sent to `sampled` (partition ids)."""

    def client_replied(self, server_round: int, partition: int, metrics: Mapping[str, float] | None,
                       error: str | None) -> None:
        """One client answered: its metrics (timings included), or the full reason of its failure."""

    def replies_done(self, server_round: int, failures: Mapping[int, str]) -> None:
        """All replies of the round are in (or the time is up); `failures`: partition -> full reason."""


class NullObserver:
    """An observer that ignores everything (tests and library use)."""

    def phase(self, text: str) -> None:
        """Ignore."""

    def round_started(self, server_round: int, sampled: Sequence[int], malicious: Sequence[int]) -> None:
        """Ignore."""

    def client_replied(self, server_round: int, partition: int, metrics: Mapping[str, float] | None,
                       error: str | None) -> None:
        """Ignore."""

    def replies_done(self, server_round: int, failures: Mapping[int, str]) -> None:
        """Ignore."""


def _metrics(reply: Message) -> dict[str, float]:
    """A reply's client metrics, or none when it carries none readable (the strategy judges the reply)."""
    try:
        return protocol.read_client_metrics(reply.content)
    except (KeyError, TypeError, ValueError):
        return {}


class RoundSource(Protocol):
    """What `ObservedGrid` reads from the strategy: node -> partition, and the record of each round."""

    partition_of: Mapping[int, int]
    rounds: Mapping[int, RoundRecord]
    global_state: Mapping[str, np.ndarray]  # the round's global model: replies are checked against it


class ObservedGrid(Grid):
    """A Grid that reports every reply to an observer as it arrives; everything else goes to the wrapped grid.

    Used only for the strategy's rounds: a non-empty `send_and_receive` is the training round whose
    `RoundRecord` the strategy has just created (`configure_train` runs before the messages are sent).
    """

    def __init__(self, grid: Grid, source: RoundSource, observer: RoundObserver, round_timeout: float) -> None:
        self.grid, self.source, self.observer, self.round_timeout = grid, source, observer, round_timeout

    def set_run(self, run: Any) -> None:
        """Delegate."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """Delegate."""
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Delegate."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegate."""
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        """Delegate."""
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegate."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send, then poll for replies until all are in or `timeout` passes, reporting each as it arrives."""
        messages = list(messages)
        if not messages:
            return []
        server_round = max(self.source.rounds)
        record = self.source.rounds[server_round]
        self.observer.round_started(server_round, record.sampled, record.malicious)
        waiting = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        failures: dict[int, str] = {}
        while waiting and (deadline is None or time.time() < deadline):
            arrived = list(self.grid.pull_messages(waiting))
            for reply in arrived:
                waiting.discard(reply.metadata.reply_to_message_id)
                partition = self.source.partition_of[reply.metadata.src_node_id]
                invalid = (reply.error.reason or "" if reply.has_error()
                           else protocol.check_fit_reply(reply.content, self.source.global_state))
                if invalid is not None:
                    failures[partition] = invalid
                    self.observer.client_replied(server_round, partition, None, invalid)
                else:
                    self.observer.client_replied(server_round, partition, _metrics(reply), None)
            replies.extend(arrived)
            if waiting:
                time.sleep(POLL_SECONDS)
        answered = {self.source.partition_of[m.metadata.src_node_id] for m in replies}
        for partition in set(record.sampled) - answered:
            failures[partition] = no_reply_reason(self.round_timeout)
        self.observer.replies_done(server_round, failures)
        return replies
