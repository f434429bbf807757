"""FlipDefenseClient: per-partition cache persistence, hardening semantics and trigger recovery (CPU, seconds).

A tiny_cnn on 16x16 synthetic images is trained centrally with a 3x3 white patch (bottom-right,
`pixel_pattern`) relabelled to class 2; the client only ever sees the model and its own clean data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from clients import BenignClient, FlipDefenseClient
from clients.flip_defense import cache_arrays
from flip_fl.attacks.poisoning import poison_batch
from flip_fl.attacks.triggers import build_trigger
from flip_fl.config import ConfigError
from flip_fl.data import client_dataset, load_datasets
from flip_fl.defenses.flip_defense.cache import UNIVERSAL, TriggerCache
from flip_fl.defenses.flip_defense.round import FlipRound
from flip_fl.evaluation.evaluator import GlobalEvaluator
from flip_fl.federation.client import ClientState, RoundInfo
from flip_fl.federation.protocol import read_state, write_state
from flip_fl.models import build_model
from flip_fl.training import sgd, train_epochs
from tests.tiny import tiny_config

TARGET = 2
SMALL = ("data.synthetic.image_size=16", "data.synthetic.train_size=2000", "data.synthetic.test_size=400",
         "federation.num_clients=4", "federation.clients_per_round=4", "attack.trigger=pixel_pattern",
         f"attack.target_label={TARGET}", "flip_defense.samples_per_class=3", "flip_defense.reinit_noise=0.0",
         "flip_defense.batch_size=64", "flip_defense.local_epochs=1")
FAST = SMALL + ("flip_defense.warmup_steps=20", "flip_defense.pair_steps=8", "flip_defense.repeat_steps=2",
                "flip_defense.max_batches=4", "flip_defense.fast.max_steps=20")
SCHEDULES = ("official", "fast")
PATCH = (slice(10, 16), slice(10, 16))  # the 3x3 patch at rows/cols 12-14 plus a 2-pixel margin
CPU = torch.device("cpu")


def client(cfg, pid: int, state: ClientState, tmp: Path, cls=FlipDefenseClient):
    return cls(cfg, pid, client_dataset(cfg, pid), CPU, state, tmp / f"p{pid}")


def info(server_round: int) -> RoundInfo:
    return RoundInfo(server_round=server_round, malicious=False, attacking=False, attacker_index=None)


def initial_state(cfg) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(cfg.model, load_datasets(cfg)[0]).state_dict()


def evaluate(cfg, state) -> dict:
    """The server's metrics of `state` (clean accuracy, ASR on the triggered non-target test images)."""
    _, test = load_datasets(cfg)
    model = build_model(cfg.model, test)
    model.load_state_dict(state)
    return GlobalEvaluator(cfg, test, CPU).evaluate(model)


def asr(cfg, state) -> float:
    return evaluate(cfg, state)["asr"]


@pytest.fixture(scope="module")
def backdoored():
    """(state_dict, cfg): a tiny_cnn with a planted patch backdoor, trained centrally on poisoned data."""
    cfg = tiny_config(*FAST)
    train, _ = load_datasets(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, train)
    trigger = build_trigger(cfg.attack, train.image_shape)
    train_epochs(model, train, sgd(model, 0.05, 0.9, 5e-4), epochs=8, batch_size=32, device=CPU,
                 generator=torch.Generator().manual_seed(0),
                 transform=lambda x, y: poison_batch(x, y, trigger, TARGET, 5))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    metrics = evaluate(cfg, state)
    assert metrics["clean_acc"] > 0.8 and metrics["asr"] > 0.9  # precondition: a working backdoor
    return state


def cache_of(state: ClientState) -> TriggerCache:
    return TriggerCache.from_arrays(cache_arrays(state))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cache_survives_rounds_and_does_not_leak_between_partitions(tmp_path, schedule):
    cfg = tiny_config(*FAST, f"flip_defense.schedule={schedule}")
    g = initial_state(cfg)
    state_a = ClientState()
    first = client(cfg, 0, state_a, tmp_path).fit(g, info(1))
    assert first.metrics["flip_warmup"] == 1.0
    cache = cache_of(state_a)
    assert cache.warmed_up and cache.num_classes == 10
    # the warm-up measured universal triggers: every target (fast) or one per batch (official, 4 batches)
    measured = 10 if schedule == "fast" else 4
    assert np.isfinite(cache.universal_sizes[:measured]).all() or np.isinf(cache.universal_sizes[:measured]).any()
    assert not np.isnan(cache.universal_sizes[:measured]).any()
    assert all(v.dtype == np.float16 for k, v in state_a.arrays.items() if k.endswith(("masks", "patterns")))

    # through a message's content, as it travels between the server (which checkpoints it) and the ClientApp
    content = RecordDict()
    write_state(content, state_a)
    restored = read_state(content)
    assert set(restored.arrays) == set(state_a.arrays)
    assert all(np.array_equal(restored.arrays[k], v, equal_nan=True) for k, v in state_a.arrays.items())

    second = client(cfg, 0, restored, tmp_path).fit(g, info(2))
    assert second.metrics["flip_warmup"] == 0.0 and second.metrics["flip_inversions"] > 0
    assert cache_of(restored).warmed_up
    snapshot = {k: v.copy() for k, v in restored.arrays.items()}

    other_state = ClientState()
    other = client(cfg, 1, other_state, tmp_path).fit(g, info(2))
    assert other.metrics["flip_warmup"] == 1.0  # a fresh partition warms up: nothing leaked to it
    assert all(np.array_equal(snapshot[k], v, equal_nan=True) for k, v in restored.arrays.items())
    assert not np.array_equal(cache_of(other_state).universal_sizes, cache_of(restored).universal_sizes,
                              equal_nan=True)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_hardening_keeps_true_labels_in_train_mode(backdoored, tmp_path, monkeypatch, schedule):
    cfg = tiny_config(*FAST, f"flip_defense.schedule={schedule}", "flip_defense.warmup_steps=60",
                      "flip_defense.pair_steps=20", "flip_defense.max_mask_fraction=0.1",
                      "flip_defense.fast.warmup_budget=20", "flip_defense.fast.max_steps=60")
    steps: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    original = FlipRound.train

    def spy(self, x, y, stamped, since):
        seen = []
        hook = self.model.register_forward_pre_hook(lambda module, _: seen.append(module.training))
        try:
            return original(self, x, y, stamped, since)
        finally:
            hook.remove()
            steps.append((x.clone(), y.clone(), all(seen) and bool(seen)))

    monkeypatch.setattr(FlipRound, "train", spy)
    c = client(cfg, 0, ClientState(), tmp_path)
    data = c.data
    result = c.fit(backdoored, info(1))
    assert result.metrics["flip_images_stamped"] > 0 and steps
    assert all(train_mode for _, _, train_mode in steps)
    pool = data.batch(torch.arange(len(data)))
    stamped = 0
    for x, y, _ in steps:
        for xi, yi in zip(x, y):
            match = (pool[0] == xi).flatten(1).all(1)
            if match.any():
                assert int(pool[1][match][0]) == int(yi)  # an untouched image keeps its label
            else:
                stamped += 1
        assert set(y.tolist()) <= set(range(10))
    assert stamped == result.metrics["flip_images_stamped"]
    # labels are the data's own: each step's label multiset is a sample of the partition's labels
    assert all(np.isin(y.numpy(), data.labels.numpy()).all() for _, y, _ in steps)


@pytest.mark.parametrize("schedule, overrides", [
    ("official", ("flip_defense.warmup_steps=200", "flip_defense.samples_per_class=3", "flip_defense.pair_steps=20",
                  "flip_defense.repeat_steps=5")),
    ("fast", ("flip_defense.fast.images_per_class=3", "flip_defense.fast.warmup_budget=50",
              "flip_defense.fast.max_steps=200")),
])
def test_client_recovers_the_planted_trigger_and_hardens_against_it(backdoored, tmp_path, schedule, overrides):
    cfg = tiny_config(*SMALL, f"flip_defense.schedule={schedule}", "flip_defense.max_batches=20",
                      "flip_defense.local_epochs=3", "flip_defense.max_mask_fraction=0.06", *overrides)
    state = ClientState()
    result = client(cfg, 0, state, tmp_path).fit(backdoored, info(1))
    cache = cache_of(state)
    assert int(np.nanargmin(cache.universal_sizes)) == TARGET  # the Neural-Cleanse signature, from clean local data
    mask = cache.masks[(UNIVERSAL, TARGET)][0].astype(np.float32)
    assert mask[PATCH].sum() / mask.sum() > 0.5  # its mass sits on the true (never revealed) patch
    assert result.metrics["flip_triggers_found"] >= 1 and result.metrics["flip_images_stamped"] > 0
    assert result.metrics["invert_seconds"] > 0 and result.metrics["harden_seconds"] > 0
    if schedule == "fast":  # every batch hardens: one round removes most of the backdoor from the local model
        assert asr(cfg, result.state) < 0.5 * asr(cfg, backdoored)
    else:  # the official warm-up stamps the target's trigger on one batch only: a dent, not a removal
        assert asr(cfg, result.state) < asr(cfg, backdoored)


def test_harden_off_trains_like_a_benign_client(tmp_path):
    cfg = tiny_config(*FAST, "flip_defense.harden=false")
    g = initial_state(cfg)
    flip = client(cfg, 0, ClientState(), tmp_path).fit(g, info(3))
    plain = client(cfg, 0, ClientState(), tmp_path, cls=BenignClient).fit(g, info(3))
    assert all(torch.equal(flip.state[k], plain.state[k]) for k in plain.state)
    assert flip.metrics == plain.metrics


def test_cache_keeps_the_most_recent_pair_triggers():
    cache = TriggerCache(num_classes=4)
    for t in range(4):
        cache.record(UNIVERSAL, t, np.ones((1, 2, 2)), np.ones((1, 2, 2)), 1.0)
    for s, t in [(0, 1), (1, 2), (2, 3), (0, 1)]:  # (0, 1) stored again: now the most recent
        cache.record(s, t, np.ones((1, 2, 2)), np.ones((1, 2, 2)), 2.0)
    cache.prune(2)
    assert [k for k in cache.masks if k[0] != UNIVERSAL] == [(2, 3), (0, 1)]
    assert sum(k[0] == UNIVERSAL for k in cache.masks) == 4
    back = TriggerCache.from_arrays(cache.to_arrays())
    assert list(back.masks) == list(cache.masks)


def test_flip_defaults_are_the_paper_mnist_values_and_bad_values_are_rejected():
    f = tiny_config().flip_defense
    assert f.schedule == "fast"
    assert (f.warmup_steps, f.pair_steps, f.repeat_steps, f.repeat_cost, f.pair_every, f.explore) == (
        400, 200, 50, 1e-2, 2, 0.3)
    assert (f.size_min, f.samples_per_class) == (1, 1)
    assert (f.success_threshold, f.max_mask_fraction, f.init_cost, f.portion) == (0.9, 0.125, 1e-3, 0.5)
    assert (f.lr, f.betas, f.local_epochs, f.max_batches, f.symmetric, f.harden) == (
        0.01, [0.5, 0.9], 10, 110, True, True)
    for override, message in [("flip_defense.betas=[0.5]", "flip_defense.betas"),
                              ("flip_defense.betas=[0.5, 1.0]", "flip_defense.betas"),
                              ("flip_defense.portion=0", "flip_defense.portion"),
                              ("flip_defense.pair_every=0", "flip_defense.pair_every"),
                              ("flip_defense.max_mask_fraction=1.5", "flip_defense.max_mask_fraction"),
                              ("flip_defense.explore=1.2", "flip_defense.explore"),
                              ("flip_defense.pair_steps=0", "flip_defense.pair_steps"),
                              ("flip_defense.schedule=slow", "flip_defense.schedule"),
                              ("flip_defense.fast.budget=0", "flip_defense.fast.budget"),
                              ("flip_defense.fast.min_steps=0", "flip_defense.fast.min_steps")]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(override)
