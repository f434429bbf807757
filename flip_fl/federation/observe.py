"""Watching a run from the server side while it goes: start-up phases, rounds, each client's reply as it arrives.

A round of slow clients (FLIP inverts triggers for minutes on a CPU) would show nothing until it ends.
The server loop (`flip_fl.federation.loop`) polls for replies itself; a `RoundWatch` tells a
`RoundObserver` about each reply the moment it arrives, and about the round's failures (error replies,
replies the strategy rejected as malformed — `protocol.check_fit_reply` — and clients that never
answered) once the strategy has judged them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from flwr.app import Message

from flip_fl.federation import protocol
from flip_fl.federation.rounds import RoundRecord


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


class RoundWatch:
    """One round's replies told to a `RoundObserver` as they arrive, and the round's failures once judged.

    The strategy is the judge (`screen_replies`: error replies, malformed replies, silent clients); the
    watch forwards its verdict, `RoundRecord.reasons`, when the round has been aggregated.
    """

    def __init__(self, observer: RoundObserver, server_round: int, record: RoundRecord,
                 partition_of: Mapping[int, int]) -> None:
        self.observer, self.server_round, self.record, self.partition_of = observer, server_round, record, partition_of
        observer.round_started(server_round, record.sampled, record.malicious)

    def arrived(self, replies: Iterable[Message]) -> None:
        """Tell the observer of each reply: its metrics, or the error the client raised."""
        for reply in replies:
            partition = self.partition_of.get(reply.metadata.src_node_id)
            if partition is None:
                continue
            if reply.has_error():
                self.observer.client_replied(self.server_round, partition, None, reply.error.reason or "")
            else:
                self.observer.client_replied(self.server_round, partition, _metrics(reply), None)

    def done(self) -> None:
        """The round is judged: tell the observer of every failure the strategy recorded."""
        self.observer.replies_done(self.server_round, dict(self.record.reasons))
