"""What a run shows while it goes: start-up phases, a live round display, one line per round, failure summaries.

Three reporters with one interface:

- `Progress`: shows nothing (library use, tests).
- `PlainProgress`: plain lines, for logs, pipes and CI (and `--quiet`): one line per start-up phase, one
  line per round (`round_line`: `format_round` with the defense's detection of the round's attackers, plus
  the ETA; with FLIP defense clients their mean inversion and hardening time), in a round slower than a
  minute an indented line per client reply, failure summaries on stderr.
- `LiveProgress`: a `rich` live display in a terminal: the current phase or round with a bar of the
  clients that replied, elapsed time and ETA over rounds, and each client's timings as its reply arrives
  (FLIP clients report `invert_seconds`, `harden_seconds`, inversion steps and triggers found); finished
  rounds scroll above it.

`make_progress` picks plain output unless stdout is a terminal.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from flip_fl.experiments.results import flip_work, format_round


def duration(seconds: float) -> str:
    """`42s`, `3m07s`, `1h02m`: short enough for a status line."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def detection(row: Mapping[str, Any]) -> str:
    """What a filtering defense did this round: `rejected 2/8, precision 0.50, recall 1.00` ('' for other rounds).

    Precision is None (shown as -) when nothing was rejected, recall when no attacker took part.
    """
    if row.get("defense_skipped"):
        return "defense skipped"
    if "defense_rejected" not in row:
        return ""
    rejected, kept = row.get("defense_rejected") or [], row.get("defense_kept") or []
    ratio = {k: "-" if row.get(f"detection_{k}") is None else f"{row[f'detection_{k}']:.2f}"
             for k in ("precision", "recall")}
    return (f"rejected {len(rejected)}/{len(rejected) + len(kept)}, precision {ratio['precision']}, "
            f"recall {ratio['recall']}")


def round_line(row: Mapping[str, Any]) -> str:
    """The round's console line: `format_round`, with the defense's detection before the round's seconds."""
    line = format_round(dict(row))
    found = detection(row)
    if not found:
        return line
    head, _, seconds = line.rpartition(" | ")
    return f"{head} | {found} | {seconds}"


def client_timings(partition: int, metrics: Mapping[str, float] | None, error: str | None,
                   malicious: bool = False) -> str:
    """`client 4: 41.0s (harden 10.9s, invert 30.1s; 120 inversion steps, 3/9 triggers found)`, or its failure.

    The timings a client reported, and what a FLIP defense client's inversion did (`flip_work`).
    """
    name = f"client {partition}" + (" (malicious)" if malicious else "")
    if error is not None:
        return f"{name}: FAILED"
    metrics = metrics or {}
    total = metrics.get("train_seconds")
    parts = [f"{k.removesuffix('_seconds')} {v:.1f}s" for k, v in sorted(metrics.items())
             if k.endswith("_seconds") and k != "train_seconds"]
    inside = ", ".join(parts) + ("; " if parts and flip_work(metrics) else "") + flip_work(metrics)
    head = f"{name}: " + (f"{total:.1f}s" if total is not None else "done")
    return head + (f" ({inside})" if inside else "")


@dataclass
class RoundClock:
    """Elapsed time and the ETA over rounds (the mean wall time of the finished rounds times those left)."""

    num_rounds: int
    started: float = field(default_factory=time.time)
    rounds_started: float | None = None
    done: int = 0

    def finish_round(self, server_round: int) -> None:
        """Round `server_round` is evaluated (round 0, the initial model, starts the clock of the rounds)."""
        if server_round == 0 or self.rounds_started is None:
            self.rounds_started = time.time()
        else:
            self.done = server_round

    def eta(self) -> float | None:
        """Seconds left, or None before a round has finished."""
        if self.rounds_started is None or self.done == 0:
            return None
        per_round = (time.time() - self.rounds_started) / self.done
        return per_round * (self.num_rounds - self.done)

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.time() - self.started


class Progress:
    """The reporter interface; this base class shows nothing."""

    def phase(self, text: str) -> None:
        """A start-up phase begins (`loading data`, `starting Ray`, `connecting 20 clients`)."""

    def round_started(self, server_round: int, sampled: Sequence[int], malicious: Sequence[int]) -> None:
        """The round's clients are sampled and their work sent."""

    def client_replied(self, server_round: int, partition: int, metrics: Mapping[str, float] | None,
                       error: str | None) -> None:
        """One client's reply arrived (its metrics, or the reason it failed)."""

    def round_finished(self, row: Mapping[str, Any]) -> None:
        """The round is evaluated; `row` is its metrics.jsonl line."""

    def failure(self, lines: Sequence[str]) -> None:
        """Failure summary lines of a round (one per distinct reason)."""

    def close(self) -> None:
        """The run is over (or aborted): release the terminal."""


class PlainProgress(Progress):
    """Plain lines: one per phase and per round on `out`, failure summaries on `err`.

    A round that runs longer than `slow_after` seconds (FLIP on a CPU: minutes) also gets an indented line
    per client reply from then on, so a log being watched shows the round is alive and what the clients did.
    """

    def __init__(self, num_rounds: int, out: TextIO | None = None, err: TextIO | None = None,
                 slow_after: float = 60.0) -> None:
        self.clock = RoundClock(num_rounds)
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.slow_after = slow_after
        self.round_start = time.time()
        self.sampled = 0
        self.replied = 0
        self.malicious: set[int] = set()

    def phase(self, text: str) -> None:
        """`[  2.1s] starting Ray`."""
        print(f"[{self.clock.elapsed():6.1f}s] {text}", file=self.out, flush=True)

    def round_started(self, server_round: int, sampled: Sequence[int], malicious: Sequence[int]) -> None:
        """Start the round's clock and reply count."""
        self.round_start, self.sampled, self.replied, self.malicious = time.time(), len(sampled), 0, set(malicious)

    def client_replied(self, server_round: int, partition: int, metrics: Mapping[str, float] | None,
                       error: str | None) -> None:
        """In a slow round: `  round 3, 2/5 replied after 1m04s: client 4: 41.0s (...)`."""
        self.replied += 1
        waited = time.time() - self.round_start
        if waited >= self.slow_after:
            timings = client_timings(partition, metrics, error, partition in self.malicious)
            print(f"  round {server_round}, {self.replied}/{self.sampled} replied after {duration(waited)}: {timings}",
                  file=self.out, flush=True)

    def round_finished(self, row: Mapping[str, Any]) -> None:
        """The round's line, with the ETA once a round has finished."""
        self.clock.finish_round(int(row["round"]))
        eta = self.clock.eta()
        tail = f" | eta {duration(eta)}" if eta is not None and row["round"] < self.clock.num_rounds else ""
        print(round_line(row) + tail, file=self.out, flush=True)

    def failure(self, lines: Sequence[str]) -> None:
        """Each summary line on stderr."""
        for line in lines:
            print(line, file=self.err, flush=True)


class LiveProgress(Progress):
    """A rich live display: phase or round status with a bar of replies, elapsed, ETA and the latest client timings."""

    def __init__(self, num_rounds: int, console: Any = None) -> None:
        from rich.console import Console  # imported here: only a terminal run needs rich's live display
        from rich.live import Live

        self.clock = RoundClock(num_rounds)
        self.console = console or Console()
        self.lock = threading.Lock()
        self.status = "starting"
        self.server_round = 0
        self.sampled = 0
        self.replied = 0
        self.failed = 0
        self.round_start = time.time()
        self.malicious: set[int] = set()
        self.recent: deque[str] = deque(maxlen=4)
        self.live = Live(console=self.console, get_renderable=self._render, refresh_per_second=4, transient=True)
        self.live.start()

    def phase(self, text: str) -> None:
        """Show the phase in the status line and keep it in the scroll-back."""
        with self.lock:
            self.status = text
        self.console.print(f"[dim][{self.clock.elapsed():6.1f}s] {text}[/dim]", highlight=False)

    def round_started(self, server_round: int, sampled: Sequence[int], malicious: Sequence[int]) -> None:
        """Reset the reply bar for the new round."""
        with self.lock:
            self.status = "round"
            self.server_round, self.sampled, self.replied, self.failed = server_round, len(sampled), 0, 0
            self.malicious = set(malicious)
            self.round_start = time.time()
            self.recent.clear()

    def client_replied(self, server_round: int, partition: int, metrics: Mapping[str, float] | None,
                       error: str | None) -> None:
        """Count the reply and show its timings."""
        with self.lock:
            self.replied += 1
            self.failed += error is not None
            self.recent.appendleft(client_timings(partition, metrics, error, partition in self.malicious))

    def round_finished(self, row: Mapping[str, Any]) -> None:
        """Print the round's line above the live area."""
        self.clock.finish_round(int(row["round"]))
        with self.lock:
            self.status = "evaluated"
        self.console.print(round_line(row), highlight=False)

    def failure(self, lines: Sequence[str]) -> None:
        """Print the summary lines in red above the live area."""
        for line in lines:
            self.console.print(f"[red]{line}[/red]", highlight=False, soft_wrap=True)

    def close(self) -> None:
        """Stop the live display."""
        self.live.stop()

    def _render(self) -> Any:
        from rich.progress_bar import ProgressBar  # imported here with the rest of rich (terminal runs only)
        from rich.table import Table

        with self.lock:
            eta = self.clock.eta()
            timing = f"elapsed {duration(self.clock.elapsed())}"
            timing += f" | eta {duration(eta)}" if eta is not None else ""
            grid = Table.grid(padding=(0, 1))
            if self.status == "round":
                failed = f", {self.failed} failed" if self.failed else ""
                grid.add_row(f"[bold]round {self.server_round}/{self.clock.num_rounds}[/bold]",
                             ProgressBar(total=max(self.sampled, 1), completed=self.replied, width=30),
                             f"{self.replied}/{self.sampled} clients replied{failed} | round "
                             f"{duration(time.time() - self.round_start)} | {timing}")
                for line in self.recent:
                    grid.add_row("", "", f"[dim]{line}[/dim]")
            else:
                grid.add_row(f"[bold]{self.status}[/bold]", "", timing)
            return grid


def make_progress(num_rounds: int, quiet: bool = False, stream: TextIO | None = None) -> Progress:
    """The live display when `stream` (stdout) is a terminal and not `quiet`; plain lines otherwise."""
    stream = stream or sys.stdout
    if quiet or not stream.isatty():
        return PlainProgress(num_rounds, out=stream)
    return LiveProgress(num_rounds)
