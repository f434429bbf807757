"""Client failures, summarised: one line per distinct reason with its count and partitions.

Flower hands a failed client back as an error reply whose reason wraps the whole remote traceback (Ray's
task error around the client's own exception, about 60 lines, sometimes with a memory report of every
process on the node). A researcher needs one line per distinct cause and the partitions it hit; the full
text of the first occurrence goes to a log file (`ErrorLog`). Ray's out-of-memory kills are recognised
and explained with the fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flip_fl.errors import clip

MAX_REASON = 200
OOM_MARKERS = ("OutOfMemoryError", "running low on memory", "killed due to memory pressure")
OOM_HINT = ("Ray killed client workers because the machine ran low on memory: run fewer clients at once "
            "(raise resources.num_cpus, the CPUs each client reserves, e.g. --set resources.num_cpus=2) "
            "or use smaller data or models")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)\w*)(?:: ?(.*))?$")
_WRAPPERS = ("RayTaskError", "ClientAppException", "RayActorError", "ActorDiedError")
_MEMORY = re.compile(r"was ([\d.]+GB) / ([\d.]+GB)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def no_reply_reason(timeout: float) -> str:
    """The reason recorded for a sampled client that sent nothing back within the round's time limit."""
    return f"no reply within resources.round_timeout ({timeout:g}s)"


def is_out_of_memory(reason: str) -> bool:
    """Whether a failure reason is Ray killing a worker for lack of memory."""
    return any(marker in reason for marker in OOM_MARKERS)


def memory_hint(reason: str) -> str:
    """What to do about an out-of-memory kill, with the node's memory use when Ray reported it."""
    usage = _MEMORY.search(reason)
    return OOM_HINT + (f" (Ray saw {usage[1]} of {usage[2]} in use)" if usage else "")


def short_reason(reason: str) -> str:
    """One line for a failure reason: the client's own exception (`RuntimeError: disk on fire`), not Ray's wrappers.

    Out-of-memory kills become `out of memory: ...` with the node's memory use.
    """
    if is_out_of_memory(reason):
        return "out of memory: Ray killed the client's worker"
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    for line in lines:
        match = _EXCEPTION_LINE.match(line)
        if match and not any(w in match[1] for w in _WRAPPERS):
            name = match[1].rsplit(".", 1)[-1] if match[1].startswith(("builtins.", "exceptions.")) else match[1]
            return clip(f"{name}: {match[2]}" if match[2] else name, MAX_REASON)
    marker = "Message: "
    if marker in reason:
        reason = reason.rsplit(marker, 1)[1]
    lines = [line.strip() for line in reason.strip().strip("'>").splitlines() if line.strip()]
    return clip(lines[0], MAX_REASON) if lines else "unknown error"


@dataclass
class FailureGroup:
    """The clients of one round that failed for the same reason."""

    reason: str
    partitions: list[int] = field(default_factory=list)
    detail: str = ""

    @property
    def out_of_memory(self) -> bool:
        """Whether Ray killed these clients for lack of memory."""
        return is_out_of_memory(self.detail)

    def describe(self) -> str:
        """`3x RuntimeError: disk on fire (partitions 3, 5, 9)`."""
        shown = ", ".join(map(str, self.partitions[:12])) + (", ..." if len(self.partitions) > 12 else "")
        plural = "s" if len(self.partitions) > 1 else ""
        return f"{len(self.partitions)}x {self.reason} (partition{plural} {shown})"


def group_failures(failures: Mapping[int, str]) -> list[FailureGroup]:
    """Failures (partition -> full reason) grouped by their one-line reason, in partition order."""
    groups: dict[str, FailureGroup] = {}
    for partition in sorted(failures):
        reason = short_reason(failures[partition])
        group = groups.setdefault(reason, FailureGroup(reason, detail=failures[partition]))
        group.partitions.append(partition)
    return list(groups.values())


def summary_lines(server_round: int, sampled: int, groups: Sequence[FailureGroup],
                  log_path: Path | None = None) -> list[str]:
    """The lines a researcher reads about a round's failures: one per distinct reason, one hint for memory kills."""
    where = f"; traceback in {log_path}" if log_path is not None else ""
    lines = [f"round {server_round}: {len(g.partitions)} of {sampled} clients failed: {g.describe()}{where}"
             for g in groups]
    memory = [g for g in groups if g.out_of_memory]
    if memory:
        lines.append(f"round {server_round}: {memory_hint(memory[0].detail)}")
    return lines


class ErrorLog:
    """`errors.log`: the full text of the first occurrence of every distinct failure reason of a run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: set[str] = set()

    def record(self, server_round: int, groups: Sequence[FailureGroup]) -> None:
        """Append the reasons not seen before in this run (with round and partitions)."""
        new = [g for g in groups if g.reason not in self.seen]
        if not new:
            return
        with self.path.open("a") as fh:
            for group in new:
                self.seen.add(group.reason)
                detail = _ANSI.sub("", group.detail).rstrip()
                fh.write(f"=== round {server_round}, partitions {group.partitions}: {group.reason}\n{detail}\n\n")
