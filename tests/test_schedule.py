"""The attack schedule: who is malicious, when each attacker attacks, and the seeded round sample."""

from __future__ import annotations

import pytest

from flip_fl.config import Config, ConfigError, attack_schedule, load_config, round_sampler
from tests.tiny import tiny_config

BASE = {
    "seed": 0,
    "data": {"name": "synthetic", "synthetic": {"train_size": 400, "test_size": 100}},
    "federation": {"num_clients": 20, "clients_per_round": 5, "num_rounds": 10},
}


def cfg(*overrides: str) -> Config:
    return tiny_config(*overrides, base=BASE)


def all_rounds(c: Config) -> range:
    return range(1, c.federation.num_rounds + 1)


def test_explicit_malicious_ids_keep_their_order():
    assert attack_schedule(cfg("attack.malicious_ids=[7, 3, 11]")).malicious == [7, 3, 11]


def test_seeded_malicious_draw_is_sorted_distinct_and_repeatable():
    ids = attack_schedule(cfg("attack.num_malicious=4")).malicious
    assert ids == sorted(set(ids)) and len(ids) == 4 and all(0 <= i < 20 for i in ids)
    assert attack_schedule(cfg("attack.num_malicious=4")).malicious == ids
    assert len({tuple(attack_schedule(cfg("attack.num_malicious=4", f"seed={s}")).malicious) for s in range(6)}) > 1
    assert attack_schedule(cfg()).malicious == []


def test_continuous_window_is_clipped_to_the_run():
    c = cfg("attack.num_malicious=2", "attack.start_round=3", "attack.end_round=6")
    assert attack_schedule(c).attack_rounds(0) == attack_schedule(c).attack_rounds(1) == {3, 4, 5, 6}
    assert attack_schedule(cfg("attack.num_malicious=2", "attack.start_round=3")).attack_rounds(1) == set(range(3, 11))
    late = cfg("attack.num_malicious=1", "attack.start_round=8", "attack.end_round=50")
    assert attack_schedule(late).attack_rounds(0) == {8, 9, 10}


def test_single_shot_without_rounds_attacks_once_at_start_round():
    c = cfg("attack.num_malicious=3", "attack.mode=single_shot", "attack.start_round=4")
    schedule = attack_schedule(c)
    assert [schedule.attack_rounds(i) for i in range(3)] == [{4}, {4}, {4}]
    assert all(schedule.attackers_due(r) == ([] if r != 4 else schedule.malicious) for r in all_rounds(c))


def test_per_attacker_rounds():
    c = cfg("attack.malicious_ids=[5, 1, 9]", "attack.mode=single_shot", "attack.rounds=[2, [4, 6], 8]")
    schedule = attack_schedule(c)
    assert [schedule.attack_rounds(i) for i in range(3)] == [{2}, {4, 6}, {8}]
    assert {r: schedule.attackers_due(r) for r in all_rounds(c) if schedule.attackers_due(r)} == {
        2: [5], 4: [1], 6: [1], 8: [9]}
    assert schedule.is_attack_round(1, 6) and not schedule.is_attack_round(5, 6)
    assert not schedule.is_attack_round(0, 2) and schedule.attacker_index(0) is None


def test_single_shot_sample_forces_each_attacker_into_its_round_only():
    c = cfg("attack.malicious_ids=[5, 1, 9, 14]", "attack.mode=single_shot", "attack.rounds=[2, 4, 6, 8]")
    bad = set(attack_schedule(c).malicious)
    for r in all_rounds(c):
        sample = round_sampler(c).sample(r, list(range(20)))
        assert sample == sorted(set(sample)) and len(sample) == 5
        assert bad & set(sample) == set(attack_schedule(c).attackers_due(r)), r


def test_continuous_sample_holds_every_attacker_every_round():
    c = cfg("attack.num_malicious=4", "federation.num_clients=100", "federation.clients_per_round=10",
            "federation.num_rounds=50")
    bad = attack_schedule(c).malicious
    for r in all_rounds(c):
        sample = round_sampler(c).sample(r, list(range(100)))
        assert len(sample) == 10 and set(bad) <= set(sample), r


def test_sampling_is_seeded():
    c = cfg("attack.num_malicious=2")
    samples = [round_sampler(c).sample(r, list(range(20))) for r in all_rounds(c)]
    assert samples == [round_sampler(c).sample(r, list(range(20))) for r in all_rounds(c)]
    assert len({tuple(s) for s in samples}) > 1
    other = cfg("attack.num_malicious=2", "seed=1")
    assert samples != [round_sampler(other).sample(r, list(range(20))) for r in all_rounds(c)]


def test_without_forcing_everyone_is_drawn_uniformly():
    c = cfg("attack.malicious_ids=[0, 1, 2, 3]", "attack.force_sampled=false")
    samples = [set(round_sampler(c).sample(r, list(range(20)))) for r in range(1, 101)]
    assert all(len(s) == 5 for s in samples)
    hits = sum(len(s & {0, 1, 2, 3}) for s in samples)
    assert 60 < hits < 140  # about 5 * 4/20 = 1 per round


def test_an_unavailable_attacker_is_not_forced():
    c = cfg("attack.malicious_ids=[0, 1]")
    sample = round_sampler(c).sample(1, [i for i in range(20) if i != 1])
    assert 0 in sample and 1 not in sample and len(sample) == 5


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar"])
def test_paper_configs_never_run_short_of_benign_clients(name):
    for overrides in ([], ["attack.mode=single_shot", "roles.malicious=clients.ModelReplacementClient",
                           "attack.scale=100", "attack.rounds=[2, 4, 6, 8]"]):
        c = load_config(f"configs/{name}.yaml", overrides)
        bad = set(attack_schedule(c).malicious)
        for r in all_rounds(c):
            sample = round_sampler(c).sample(r, list(range(100)))
            assert len(sample) == 10 and bad & set(sample) == set(attack_schedule(c).attackers_due(r))


def test_too_few_benign_clients_is_an_error_naming_them():
    """6 clients, 3 malicious, 4 per round: a round without attackers needs 4 benign clients, only 3 exist."""
    with pytest.raises((ConfigError, RuntimeError), match="benign"):
        c = cfg("federation.num_clients=6", "federation.clients_per_round=4", "attack.num_malicious=3",
                "attack.mode=single_shot", "attack.rounds=[2, 4, 6]")
        for r in all_rounds(c):
            round_sampler(c).sample(r, list(range(6)))
