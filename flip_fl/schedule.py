"""Who is malicious, when each attacker attacks, and which clients a round samples.

All of it is a pure function of the seed and the settings, so a run can be repeated exactly (Flower's
own sampling draws from a set of random node ids and is not reproducible). This module knows nothing of
the config file: `flip_fl.config.derived` builds the `AttackSchedule` and `RoundSampler` of a config.

Attack windows are `RoundWindow`s (first and last round, constant size), so a schedule and the questions
asked of it (`max_due`, `fewest_due`) cost the same for 10 rounds as for 10**9.
"""

from __future__ import annotations

from collections import abc
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from flip_fl.seeds import ATTACKERS, numpy_rng


def draw_attackers(seed: int, num_clients: int, count: int) -> list[int]:
    """A seeded draw of `count` distinct malicious partition ids, sorted ascending."""
    rng = numpy_rng(seed, ATTACKERS)
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))


class RoundWindow(abc.Set[int]):
    """The rounds `first` ... `last` as a set of constant size (empty when `last < first`)."""

    __slots__ = ("first", "last")

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last

    def __contains__(self, server_round: object) -> bool:
        return isinstance(server_round, int) and self.first <= server_round <= self.last

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.last + 1))

    def __len__(self) -> int:
        return max(self.last - self.first + 1, 0)

    def __repr__(self) -> str:
        return f"RoundWindow({self.first}, {self.last})"


def attack_window(single_shot: bool, start_round: int, end_round: int | None, last_round: int) -> abc.Set[int]:
    """An attacker's rounds without an explicit list.

    `start_round` alone (single shot), or every round from `start_round` to `end_round` (None: the last
    round) clipped to the run (continuous), as a `RoundWindow`.
    """
    if single_shot:
        return frozenset({start_round})
    end = last_round if end_round is None else min(end_round, last_round)
    return RoundWindow(start_round, end)


def due_counts(rounds: list[abc.Set[int]], num_rounds: int) -> list[tuple[int, int]]:
    """How many attackers are due, as (first round, count) steps covering rounds 1 ... `num_rounds`.

    The count holds from a step's first round to the next step's; the cost grows with the number of
    windows and explicit rounds, never with `num_rounds`.
    """
    changes: dict[int, int] = {}
    for item in rounds:
        spans = [(item.first, item.last)] if isinstance(item, RoundWindow) else [(r, r) for r in item]
        for first, last in spans:
            if first <= last:
                changes[first] = changes.get(first, 0) + 1
                changes[last + 1] = changes.get(last + 1, 0) - 1
    steps, count = [(1, 0)], 0
    for start in sorted(changes):
        count += changes[start]
        if start <= 1:
            steps[0] = (1, count)
        elif start <= num_rounds:
            steps.append((start, count))
    return steps


@dataclass(frozen=True)
class AttackSchedule:
    """The malicious partition ids in attacker order, and the rounds in which each attacker attacks."""

    malicious: list[int]
    rounds: list[abc.Set[int]]

    def attack_rounds(self, attacker_index: int) -> abc.Set[int]:
        """Rounds in which attacker `attacker_index` (position in `malicious`) attacks."""
        return self.rounds[attacker_index]

    def attacker_index(self, partition_id: int) -> int | None:
        """Position of a partition in `malicious` (None for a benign partition)."""
        return self.malicious.index(partition_id) if partition_id in self.malicious else None

    def attackers_due(self, server_round: int) -> list[int]:
        """Partition ids of the attackers scheduled to attack in `server_round`."""
        return [pid for pid, rounds in zip(self.malicious, self.rounds) if server_round in rounds]

    def is_attack_round(self, partition_id: int, server_round: int) -> bool:
        """Whether this malicious partition attacks in this round (benign partitions never do)."""
        index = self.attacker_index(partition_id)
        return index is not None and server_round in self.rounds[index]

    def max_due(self, num_rounds: int) -> int:
        """Largest number of attackers due in a single round of a run of `num_rounds` rounds."""
        return max(count for _, count in due_counts(self.rounds, num_rounds))

    def fewest_due(self, num_rounds: int) -> tuple[int, int]:
        """(round, count): the first round of a run of `num_rounds` rounds with the fewest attackers due."""
        first, count = min(due_counts(self.rounds, num_rounds), key=lambda step: step[1])
        return first, count


@dataclass(frozen=True)
class RoundSampler:
    """Seeded sample of partition ids for each round, sorted by partition id.

    With `force_attackers`, the attackers due in a round are always in its sample and the rest is drawn
    from the benign partitions (the FLIP paper's fixed adversary list); malicious clients not due that
    round are not drawn. Otherwise every available partition is equally likely.
    """

    seed: int
    clients_per_round: int
    schedule: AttackSchedule
    force_attackers: bool = True

    def sample(self, server_round: int, available: list[int]) -> list[int]:
        """The partition ids sampled in `server_round` among the `available` ones."""
        k = min(self.clients_per_round, len(available))
        rng = numpy_rng(self.seed, server_round)
        pool = sorted(available)
        forced: list[int] = []
        if self.force_attackers and self.schedule.malicious:
            forced = [pid for pid in self.schedule.attackers_due(server_round) if pid in available]
            bad = set(self.schedule.malicious)
            pool = [pid for pid in pool if pid not in bad]
        need = max(k - len(forced), 0)
        if need > len(pool):
            raise RuntimeError(f"round {server_round}: {need} benign clients needed but only {len(pool)} are available")
        drawn = rng.choice(len(pool), size=need, replace=False) if need else np.empty(0, dtype=np.int64)
        return sorted(forced + [pool[int(i)] for i in drawn])
