"""Who is malicious, when each attacker attacks, and which clients a round samples.

All of it is a pure function of the config and the seed, so a run can be repeated exactly
(Flower's own sampling draws from a set of random node ids and is not reproducible).
"""

from __future__ import annotations

import numpy as np

from flip_fl.config import Config, num_attackers


def malicious_ids(cfg: Config) -> list[int]:
    """Malicious partition ids in attacker order: explicit ids, or a seeded draw sorted ascending."""
    if cfg.attack.malicious_ids is not None:
        return list(cfg.attack.malicious_ids)
    n = num_attackers(cfg)
    rng = np.random.default_rng([cfg.seed, 0xA77AC])
    return sorted(int(i) for i in rng.choice(cfg.federation.num_clients, size=n, replace=False))


def attack_rounds(cfg: Config, attacker_index: int) -> set[int]:
    """Rounds in which attacker `attacker_index` (position in `malicious_ids`) attacks."""
    attack, last = cfg.attack, cfg.federation.num_rounds
    if attack.rounds is not None:
        item = attack.rounds[attacker_index]
        return set(item) if isinstance(item, list) else {item}
    if attack.mode == "single_shot":
        return {attack.start_round}
    end = last if attack.end_round is None else min(attack.end_round, last)
    return set(range(attack.start_round, end + 1))


def attackers_due(cfg: Config, server_round: int) -> list[int]:
    """Partition ids of the attackers scheduled to attack in `server_round`."""
    return [pid for i, pid in enumerate(malicious_ids(cfg)) if server_round in attack_rounds(cfg, i)]


def is_attack_round(cfg: Config, partition_id: int, server_round: int) -> bool:
    """Whether this malicious partition attacks in this round (benign partitions never do)."""
    ids = malicious_ids(cfg)
    return partition_id in ids and server_round in attack_rounds(cfg, ids.index(partition_id))


def sample_round(cfg: Config, server_round: int, available: list[int]) -> list[int]:
    """Seeded sample of partition ids for a round, sorted by partition id.

    With `attack.force_sampled`, the attackers due this round are always in the sample and the rest
    is drawn from the benign partitions (the FLIP paper's fixed adversary list); malicious clients
    not due this round are not drawn. Otherwise every available partition is equally likely.
    """
    k = min(cfg.federation.clients_per_round, len(available))
    rng = np.random.default_rng([cfg.seed, server_round])
    pool = sorted(available)
    forced: list[int] = []
    if cfg.attack.force_sampled and num_attackers(cfg) > 0:
        forced = [pid for pid in attackers_due(cfg, server_round) if pid in available]
        bad = set(malicious_ids(cfg))
        pool = [pid for pid in pool if pid not in bad]
    need = max(k - len(forced), 0)
    if need > len(pool):
        raise RuntimeError(f"round {server_round}: {need} benign clients needed but only {len(pool)} are available")
    drawn = rng.choice(len(pool), size=need, replace=False) if need else []
    return sorted(forced + [pool[int(i)] for i in drawn])
