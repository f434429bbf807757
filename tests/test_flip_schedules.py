"""The two FLIP client schedules step by step, with the inversion replaced by a scripted stub.

`official`: the official code's per-batch state machine (warm-up target per batch, pair windows, the
repeat run at cost 1e-2 after a success, summed symmetric loss, per-side stamping counts).
`fast`: the budget arithmetic, the candidate list and the triggers that harden every batch.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from flip_fl.data import ImageDataset
from flip_fl.defenses.flip_defense.cache import UNIVERSAL, TriggerCache
from flip_fl.defenses.flip_defense.fast import candidate_directions, fast_round, hardening_triggers, inversion_steps
from flip_fl.defenses.flip_defense.hardening import stamp_counts
from flip_fl.defenses.flip_defense.inversion import InversionResult
from flip_fl.defenses.flip_defense.official import official_round, open_window
from flip_fl.defenses.flip_defense.round import FlipRound, RoundStreams, hardening_images
from tests.tiny import tiny_config

N_CLASSES, PER_CLASS, SIDE = 10, 10, 8


def dataset() -> ImageDataset:
    """10 images of each class, 1x8x8: a batch of the whole set holds every class 10 times."""
    labels = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)
    images = (torch.rand(len(labels), 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0)) * 200).to(torch.uint8)
    return ImageDataset(images, labels, N_CLASSES, (0.5,), (0.25,))


class Recorder:
    """Stands in for `FlipRound.invert`: records each call and answers from a script of successes."""

    def __init__(self, succeed=lambda call, k: True, size: float = 3.0) -> None:
        self.calls: list[dict] = []
        self.succeed, self.size = succeed, size

    def __call__(self, r: FlipRound, tasks, settings, starts, init_costs=None) -> InversionResult:
        call = {"targets": [t for _, t in tasks], "sizes": [int(x.shape[0]) for x, _ in tasks],
                "steps": settings.steps, "cost": settings.init_cost, "sum_ce": settings.sum_ce,
                "cap": settings.max_mask_fraction, "starts": [s is not None for s in starts]}
        self.calls.append(call)
        k = len(tasks)
        ok = torch.tensor([self.succeed(len(self.calls) - 1, j) for j in range(k)])
        masks = torch.zeros(k, 1, SIDE, SIDE)
        masks[:, :, :2, :2] = self.size / 4  # |m|_1 = size
        masks[~ok] = 0
        patterns = torch.ones(k, 1, SIDE, SIDE)
        l1 = torch.where(ok, self.size, float("inf")).double()
        r.stats["flip_inversions"] += 1
        return InversionResult(masks=masks, patterns=patterns, success=ok, mask_l1=l1,
                               attack_success_rate=ok.double(), oversized=torch.zeros(k, dtype=torch.bool),
                               final_cost=torch.full((k,), settings.init_cost, dtype=torch.float64),
                               best_masks=masks, best_patterns=patterns, steps=settings.steps)


def make_round(*overrides: str, cache: TriggerCache | None = None, seed: int = 0) -> FlipRound:
    cfg = tiny_config("flip_defense.batch_size=100", "flip_defense.local_epochs=30", "flip_defense.max_batches=16",
                      "flip_defense.portion=0.5", *overrides)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIDE * SIDE, N_CLASSES))
    streams = RoundStreams(*(torch.Generator().manual_seed(seed + i) for i in range(3)),
                           pairs=np.random.default_rng(seed))
    return FlipRound(model, torch.optim.SGD(model.parameters(), lr=0.0), dataset(), cfg.flip_defense,
                     cache or TriggerCache(num_classes=N_CLASSES), torch.device("cpu"), streams, 100)


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(FlipRound, "invert", lambda self, *a, **k: rec(self, *a, **k))
    return rec


# ----------------------------------------------------------------------------- official


def test_official_warm_up_inverts_one_target_per_batch_uncapped_on_size_min_images(recorder):
    r = make_round("flip_defense.schedule=official", "flip_defense.samples_per_class=1", "flip_defense.size_min=1",
                   "flip_defense.warmup_steps=400")
    official_round(r, warm_up=True)
    warm = recorder.calls[:N_CLASSES]
    assert [c["targets"] for c in warm] == [[t] for t in range(N_CLASSES)]
    assert all(c["sizes"] == [N_CLASSES - 1] and c["steps"] == 400 and c["cap"] == 1.0 for c in warm)
    assert all(not c["sum_ce"] for c in warm)
    # each warm-up batch stamps int(portion * non-target images) = int(0.5 * 90) = 45
    assert r.stats["flip_warmup"] == 1.0 and r.cache.warmed_up
    assert np.isfinite(r.cache.universal_sizes).all()


def test_official_pairs_new_every_batch_for_ten_batches_then_every_two(recorder):
    r = make_round("flip_defense.schedule=official", "flip_defense.explore=1.0", "flip_defense.pair_steps=200",
                   "flip_defense.repeat_steps=50", "flip_defense.repeat_cost=0.01", "flip_defense.init_cost=0.001")
    official_round(r, warm_up=False)
    calls = recorder.calls
    assert len(calls) == 16  # every batch holds both classes of its pair: one symmetric call each
    assert all(c["sum_ce"] and len(c["targets"]) == 2 and c["sizes"] == [PER_CLASS, PER_CLASS] for c in calls)
    # batches 0-9 open a window each (200 steps, cost 1e-3); then windows of two: 200 @ 1e-3, 50 @ 1e-2
    assert [(c["steps"], c["cost"]) for c in calls[:10]] == [(200, 0.001)] * 10
    assert [(c["steps"], c["cost"]) for c in calls[10:]] == [(200, 0.001), (50, 0.01)] * 3
    pairs = [tuple(c["targets"][::-1]) for c in calls]  # (s, t) from the targets (t, s)
    assert all(pairs[i] == pairs[i + 1] for i in (10, 12, 14))
    assert r.stats["flip_batches_trained"] == 16
    # symmetric stamping: int(min(n_s, n_t) * portion) = 5 images of each side
    assert r.stats["flip_images_stamped"] == 16 * 2 * 5


def test_official_repeat_after_a_failure_runs_the_full_inversion_again(monkeypatch):
    rec = Recorder(succeed=lambda call, k: not (call == 10 and k == 1))  # batch 10's t->s direction fails
    monkeypatch.setattr(FlipRound, "invert", lambda self, *a, **k: rec(self, *a, **k))
    r = make_round("flip_defense.schedule=official", "flip_defense.explore=1.0", "flip_defense.pair_steps=200",
                   "flip_defense.repeat_steps=50")
    official_round(r, warm_up=False)
    assert [(c["steps"], c["cost"]) for c in rec.calls[10:14]] == [(200, 0.001), (200, 0.001), (200, 0.001), (50, 0.01)]


def test_official_exploits_the_smallest_known_pair_with_a_new_source(recorder):
    cache = TriggerCache(num_classes=N_CLASSES)
    cache.mask_sizes[:] = 50.0
    cache.mask_sizes[3, 7] = 1.0
    cache.mask_sizes[4, 7] = 2.0
    r = make_round("flip_defense.schedule=official", "flip_defense.explore=0.0", "flip_defense.symmetric=false",
                   cache=cache)
    official_round(r, warm_up=False)
    sources = [c["targets"] for c in recorder.calls[:3]]
    assert sources == [[7], [7], [7]]  # always target 7 ...
    assert all(not c["sum_ce"] for c in recorder.calls)  # one direction: mean cross-entropy
    # ... from the smallest pair whose source differs from the last window's: 3, then 4, then 3 again
    sizes = r.cache.mask_sizes
    assert sizes[3, 7] == 3.0 and sizes[4, 7] == 3.0  # the stub's size was recorded for both


def test_official_window_choice_avoids_the_last_source_and_explores():
    cache = TriggerCache(num_classes=N_CLASSES)
    cache.mask_sizes[3, 7], cache.mask_sizes[4, 7] = 1.0, 2.0
    r = make_round("flip_defense.explore=0.0", cache=cache)
    first = open_window(r, list(range(N_CLASSES)), None)
    assert (first.source, first.target, first.steps, first.cost) == (3, 7, r.flip.pair_steps, r.flip.init_cost)
    assert (open_window(r, list(range(N_CLASSES)), first).source, first.target) == (4, 7)
    assert open_window(r, [3], first) is None  # no other source present: the batch is skipped
    r = make_round("flip_defense.explore=1.0", cache=cache)
    picks = {(w.source, w.target) for w in (open_window(r, [5, 6], None) for _ in range(200))}
    assert {s for s, _ in picks} == {5, 6} and len(picks) > 10 and all(s != t for s, t in picks)


def test_stamp_counts_stamps_each_side_its_own_count():
    x = torch.full((20, 1, 4, 4), 0.5)
    y = torch.tensor([0] * 9 + [1] * 6 + [2] * 5)
    m0, m1 = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    m0[0, 0, 0], m1[0, 3, 3] = 1.0, 1.0
    portion = 0.5
    length = int(min(9, 6) * portion)  # 3 per side, not floor(0.5 * 15) = 7 over both
    x2, n = stamp_counts(x, y, [(m0, torch.ones(1, 4, 4), [0], length), (m1, torch.zeros(1, 4, 4), [1], length)],
                         torch.Generator().manual_seed(0))
    side0 = (x2[:, 0, 0, 0] == 1.0)
    side1 = (x2[:, 0, 3, 3] == 0.0)
    assert n == 6 and int(side0.sum()) == 3 and int(side1.sum()) == 3
    assert set(y[side0].tolist()) == {0} and set(y[side1].tolist()) == {1}
    assert torch.equal(x2[y == 2], x[y == 2])
    assert stamp_counts(x, y, [(m0, torch.ones(1, 4, 4), [0], 0)])[1] == 0


# ----------------------------------------------------------------------------- fast


def test_hardening_images_and_the_budget_in_steps():
    assert hardening_images(100, 64, 10, None) == 1000
    assert hardening_images(100, 64, 10, 3) == 64 + 36 + 64  # one full epoch, then one batch
    assert hardening_images(248, 64, 10, 110) == 2480  # 40 batches: under the cap
    assert hardening_images(0, 64, 10, 110) == 0
    fast = tiny_config().flip_defense.fast
    assert inversion_steps(fast, False, 2480, 95) == int(fast.budget * 2480 / 95)
    assert inversion_steps(fast, True, 2480, 95) == min(fast.max_steps, int(fast.warmup_budget * 2480 / 95))
    assert inversion_steps(fast, False, 10, 95) == fast.min_steps
    assert inversion_steps(replace(fast, budget=100.0), False, 2480, 95) == fast.max_steps


def test_fast_candidates_are_every_universal_target_the_smallest_pairs_and_random_ones():
    cache = TriggerCache(num_classes=N_CLASSES)
    cache.universal_sizes[:] = 40.0
    cache.universal_sizes[2] = 5.0  # pairs never inverted are ranked by their target's universal size
    cache.mask_sizes[4, 6] = 1.0
    r = make_round()
    fast = replace(r.flip.fast, pairs=3, explore_pairs=2)
    directions = candidate_directions(cache, list(range(N_CLASSES)), fast, r)
    assert directions[:N_CLASSES] == [(UNIVERSAL, t) for t in range(N_CLASSES)]
    pairs = directions[N_CLASSES:]
    assert len(pairs) == 5 and len(set(pairs)) == 5
    assert pairs[0] == (4, 6) and all(t == 2 for _, t in pairs[1:3])


def test_fast_round_inverts_once_and_hardens_every_batch_with_the_cached_triggers(recorder):
    r = make_round("flip_defense.fast.pairs=2", "flip_defense.fast.explore_pairs=1")
    fast_round(r, warm_up=True)
    assert len(recorder.calls) == 1
    call = recorder.calls[0]
    assert call["targets"][:N_CLASSES] == list(range(N_CLASSES)) and len(call["targets"]) == N_CLASSES + 3
    assert not call["sum_ce"] and call["steps"] == inversion_steps(r.flip.fast, True, 1600, sum(call["sizes"]))
    assert r.stats["flip_batches_trained"] == 16 and r.stats["flip_batches_skipped"] == 0
    masks, _, sources = hardening_triggers(r)
    assert len(masks) == N_CLASSES + 3 and all(len(s) in (1, N_CLASSES - 1) for s in sources)
    assert r.stats["flip_images_stamped"] == 16 * int(0.5 * 100)
    # a later selection continues from every cached trigger
    fast_round(r, warm_up=False)
    assert all(recorder.calls[1]["starts"][:N_CLASSES])


def test_fast_hardening_skips_cached_triggers_over_the_cap():
    r = make_round("flip_defense.max_mask_fraction=0.1")  # cap 6.4 px on 8x8
    r.cache.record(UNIVERSAL, 1, np.full((1, SIDE, SIDE), 0.05, np.float32), np.ones((1, SIDE, SIDE), np.float32), 3.2)
    r.cache.record(UNIVERSAL, 2, np.full((1, SIDE, SIDE), 0.5, np.float32), np.ones((1, SIDE, SIDE), np.float32), 32.0)
    masks, _, sources = hardening_triggers(r)
    assert len(masks) == 1 and sources == [[c for c in range(N_CLASSES) if c != 1]]
