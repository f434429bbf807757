"""Facts derived from a config that several layers need: the attack schedule, the round sampler, defense params.

One function each, so the rule lives in one place (the validation, the strategies and the run all use
these).
"""

from __future__ import annotations

from collections import abc
from typing import Any

from flip_fl.config.schema import params_class, section_name
from flip_fl.config.sections import Config
from flip_fl.registry import DEFENSES
from flip_fl.schedule import AttackSchedule, RoundSampler, attack_window, draw_attackers


def num_attackers(cfg: Config) -> int:
    """How many malicious clients the config asks for."""
    if cfg.attack.malicious_ids is not None:
        return len(cfg.attack.malicious_ids)
    return cfg.attack.num_malicious


def attack_schedule(cfg: Config) -> AttackSchedule:
    """Malicious partition ids (explicit, or a seeded draw) and each attacker's rounds."""
    attack, fed = cfg.attack, cfg.federation
    if attack.malicious_ids is not None:
        malicious = list(attack.malicious_ids)
    else:
        malicious = draw_attackers(cfg.seed, fed.num_clients, num_attackers(cfg))
    rounds: list[abc.Set[int]] = []
    for i in range(len(malicious)):
        if attack.rounds is not None:
            item = attack.rounds[i]
            rounds.append(frozenset(item) if isinstance(item, list) else frozenset({item}))
        else:
            rounds.append(attack_window(attack.mode == "single_shot", attack.start_round, attack.end_round,
                                        fed.num_rounds))
    return AttackSchedule(malicious, rounds)


def round_sampler(cfg: Config) -> RoundSampler:
    """The seeded per-round sample of clients, attackers forced in when `attack.force_sampled`."""
    return RoundSampler(cfg.seed, cfg.federation.clients_per_round, attack_schedule(cfg), cfg.attack.force_sampled)


def max_attackers_per_round(cfg: Config) -> int:
    """Largest number of attackers due in a single round (bounds forced sampling)."""
    return attack_schedule(cfg).max_due(cfg.federation.num_rounds)



def defense_params(cfg: Config) -> Any:
    """The parameters of the defense `defense.name` (its `defense.<name>` section, or the defaults)."""
    cls = DEFENSES.lookup(cfg.defense.name)
    given = cfg.defense.params.get(section_name(DEFENSES, cfg.defense.name))
    return given if given is not None else params_class(cls)()
