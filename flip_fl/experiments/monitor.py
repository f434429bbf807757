"""The run's `RoundObserver`: forwards events to the progress display and summarises each round's failures.

Failures of a round become one line per distinct reason (count and partitions) on the display, and the
full text of the first occurrence of each reason goes to `RUN_DIR/errors.log`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from flip_fl.experiments.progress import Progress
from flip_fl.federation.failures import ErrorLog, group_failures, summary_lines


class RunMonitor:
    """Implements `flip_fl.federation.observe.RoundObserver` for one run directory."""

    def __init__(self, progress: Progress, out_dir: Path) -> None:
        self.progress = progress
        self.errors = ErrorLog(out_dir / "errors.log")
        self.sampled: dict[int, int] = {}

    def phase(self, text: str) -> None:
        """Forward to the display."""
        self.progress.phase(text)

    def round_started(self, server_round: int, sampled: Sequence[int], malicious: Sequence[int]) -> None:
        """Remember the round's size and forward."""
        self.sampled = {server_round: len(sampled)}
        self.progress.round_started(server_round, sampled, malicious)

    def client_replied(self, server_round: int, partition: int, metrics: Mapping[str, float] | None,
                       error: str | None) -> None:
        """Forward to the display."""
        self.progress.client_replied(server_round, partition, metrics, error)

    def replies_done(self, server_round: int, failures: Mapping[int, str]) -> None:
        """Summarise the round's failures: one line per reason on the display, first tracebacks to errors.log."""
        if not failures:
            return
        groups = group_failures(failures)
        self.errors.record(server_round, groups)
        sampled = self.sampled.get(server_round, len(failures))
        self.progress.failure(summary_lines(server_round, sampled, groups, self.errors.path))
