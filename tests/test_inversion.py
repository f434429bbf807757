"""Tests for flip_fl.defenses.flip_defense.inversion (CPU, toy data, a few seconds).

A small CNN is trained for a few hundred Adam steps on 10 classes of noisy, smooth
class-prototype images (1 x 16 x 16).  The poisoned variant relabels 10 % of the training
images to class 0 after stamping a 3 x 3 white patch in the bottom-right corner.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flip_fl.defenses.flip_defense.inversion import (
    InversionResult,
    InversionSettings,
    invert_triggers,
    stamp,
    universal_tasks,
)

H = W = 16
NUM_CLASSES = 10
TARGET = 0
PATCH = (slice(13, 16), slice(13, 16))  # true trigger: rows 13-15, cols 13-15
NEAR = (slice(11, 16), slice(11, 16))  # 2-pixel neighbourhood of the patch
# 16 x 16 toy images: natural (clean-model) triggers need ~15-30 pixels, the planted one ~5;
# a cap of 1/16 of the image (16 px) separates them (the reference caps are for 28x28/32x32).
CAP = 1.0 / 16.0


def make_data(n_per_class: int, seed: int, poison_frac: float = 0.0, noise: float = 0.15):
    protos = F.interpolate(
        torch.rand(NUM_CLASSES, 1, 4, 4, generator=torch.Generator().manual_seed(1234)),
        size=(H, W),
        mode="bilinear",
        align_corners=False,
    )
    protos = 0.15 + 0.6 * protos
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    x = (protos[y] + noise * torch.randn(len(y), 1, H, W, generator=g)).clamp(0, 1)
    if poison_frac > 0:
        cand = torch.nonzero(y != TARGET).flatten()
        sel = cand[torch.randperm(len(cand), generator=g)[: int(poison_frac * len(y))]]
        x[sel, :, PATCH[0], PATCH[1]] = 1.0
        y = y.clone()
        y[sel] = TARGET
    return x, y


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.f1 = nn.Linear(16 * 4 * 4, 32)
        self.f2 = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.bn(self.c2(x))), 2)
        return self.f2(F.relu(self.f1(x.flatten(1))))


def train(x, y, steps: int = 200, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return model


def accuracy_and_asr(model, held_out) -> tuple[float, float]:
    """Clean accuracy on `held_out` and the patch's attack success on its non-target images."""
    xt, yt = held_out
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
        xp = xt[yt != TARGET].clone()
        xp[:, :, PATCH[0], PATCH[1]] = 1.0
        asr = (model(xp).argmax(1) == TARGET).float().mean().item()
    return acc, asr


@pytest.fixture(scope="module")
def held_out():
    return make_data(20, seed=1)


@pytest.fixture(scope="module")
def poisoned_model(held_out):
    x, y = make_data(100, seed=0, poison_frac=0.1)
    model = train(x, y)
    acc, asr = accuracy_and_asr(model, held_out)
    assert acc > 0.9 and asr > 0.9, (acc, asr)  # precondition: backdoor planted
    return model


@pytest.fixture(scope="module")
def clean_model(held_out):
    x, y = make_data(100, seed=0)
    model = train(x, y)
    acc, asr = accuracy_and_asr(model, held_out)
    assert acc > 0.9 and asr < 0.3, (acc, asr)
    return model


def by_class(x, y, lo: int = 0, hi: int | None = None):
    return {c: x[y == c][lo:hi] for c in range(NUM_CLASSES)}


# ----------------------------------------------------------------------------- basics


def test_stamp_is_convex_combination():
    x = torch.rand(4, 3, 5, 5)
    m = torch.zeros(1, 5, 5)
    m[0, 1, 2] = 1.0
    m[0, 3, 3] = 0.25
    p = torch.rand(3, 5, 5)
    out = stamp(x, m, p)
    assert torch.equal(out[:, :, 0, 0], x[:, :, 0, 0])
    assert torch.allclose(out[:, :, 1, 2], p[:, 1, 2].expand(4, 3))
    assert torch.allclose(out[:, :, 3, 3], 0.75 * x[:, :, 3, 3] + 0.25 * p[:, 3, 3])
    assert torch.equal(stamp(x, torch.zeros(1, 5, 5), p), x)


def test_settings_defaults_and_datasets():
    s = InversionSettings()
    assert (s.lr, s.betas, s.init_cost, s.cost_up, s.patience) == (0.1, (0.5, 0.9), 1e-3, 1.5, 10)
    assert s.cost_down == pytest.approx(1.5**1.5)
    m = InversionSettings.for_dataset("mnist")
    c = InversionSettings.for_dataset("cifar10", steps=7)
    assert (m.success_threshold, m.max_mask_fraction, m.steps) == (0.9, 1 / 8, 400)
    assert (c.success_threshold, c.max_mask_fraction, c.steps) == (0.85, 1 / 4, 7)
    assert InversionSettings.for_dataset("fashion_mnist").steps == 600


def test_universal_tasks_excludes_target():
    imgs = {c: torch.full((4, 1, 2, 2), float(c)) for c in range(4)}
    tasks = universal_tasks(imgs, num_classes=5, per_class=3)
    assert [t for _, t in tasks] == [0, 1, 2, 3, 4]
    for x, t in tasks:
        vals = sorted({int(v) for v in x[:, 0, 0, 0].tolist()})
        assert vals == [c for c in range(4) if c != t]
        assert x.shape[0] == 3 * len(vals)
    g = torch.Generator().manual_seed(0)
    assert universal_tasks(imgs, 4, per_class=2, generator=g)[0][0].shape == (6, 1, 2, 2)
    # target whose only images are its own: empty task
    only = universal_tasks({1: torch.ones(2, 1, 2, 2)}, num_classes=2, per_class=5)
    assert only[0][0].shape == (2, 1, 2, 2) and only[1][0].shape == (0, 1, 2, 2)


# ----------------------------------------------------------------------------- behaviour


def test_inversion_recovers_planted_trigger(poisoned_model, held_out):
    xt, yt = held_out
    tasks = universal_tasks(by_class(xt, yt, 0, 3), NUM_CLASSES, per_class=3)
    settings = InversionSettings(steps=150, max_mask_fraction=CAP, success_threshold=0.9)
    res = invert_triggers(poisoned_model, tasks, settings, torch.Generator().manual_seed(0))
    assert isinstance(res, InversionResult)
    assert res.masks.shape == (NUM_CLASSES, 1, H, W)
    assert res.patterns.shape == (NUM_CLASSES, 1, H, W)
    assert bool(res.success[TARGET])
    m = res.masks[TARGET, 0]
    near = m[NEAR[0], NEAR[1]].sum() / m.sum()
    assert near > 0.5, float(near)
    assert float(res.mask_l1[TARGET]) <= CAP * H * W
    assert float(res.attack_success_rate[TARGET]) >= settings.success_threshold
    # Neural-Cleanse signature: the backdoor target has the smallest trigger of all targets
    assert int(torch.argmin(res.mask_l1)) == TARGET
    # the inverted trigger also transfers to unseen images of the other classes
    xo = xt[yt != TARGET]
    xo = xo[torch.arange(len(xo)) % 20 >= 3]  # images not used in the inversion
    with torch.no_grad():
        pred = poisoned_model(stamp(xo, res.masks[TARGET], res.patterns[TARGET])).argmax(1)
    assert (pred == TARGET).float().mean() >= 0.8
    # failed / oversized tasks are empty
    assert torch.all(res.masks[~res.success] == 0)
    assert torch.all(res.patterns[~res.success] == 0)


def test_clean_model_mostly_empty(clean_model, held_out):
    xt, yt = held_out
    tasks = universal_tasks(by_class(xt, yt, 0, 3), NUM_CLASSES, per_class=3)
    settings = InversionSettings(steps=150, max_mask_fraction=CAP)
    res = invert_triggers(clean_model, tasks, settings, torch.Generator().manual_seed(0))
    n_empty = int((~res.success).sum())
    print(f"\nclean model: {n_empty}/{NUM_CLASSES} targets empty; mask_l1={res.mask_l1.numpy().round(1)}")
    assert n_empty > NUM_CLASSES // 2
    assert torch.all(res.masks[~res.success] == 0)
    # sizes of discarded successful triggers are still reported
    assert torch.all(torch.isfinite(res.mask_l1[res.oversized]))
    assert torch.all(res.mask_l1[res.oversized] > CAP * H * W)


def test_batched_matches_looped(poisoned_model, held_out):
    """K tasks in one batched run behave like K separate runs (same init, no noise)."""
    xt, yt = held_out
    pairs = [(1, 0), (2, 0), (3, 0), (0, 4), (5, 6)]
    tasks = [(xt[yt == s][:8], t) for s, t in pairs]
    K = len(tasks)
    g = torch.Generator().manual_seed(3)
    init_m = torch.rand(K, 1, H, W, generator=g)
    init_p = torch.rand(K, 1, H, W, generator=g)
    settings = InversionSettings(steps=80, max_mask_fraction=CAP, reinit_noise=0.0)

    t0 = time.perf_counter()
    batched = invert_triggers(poisoned_model, tasks, settings, torch.Generator().manual_seed(0),
                              init_masks=init_m, init_patterns=init_p)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    looped = [
        invert_triggers(poisoned_model, [tasks[k]], settings, torch.Generator().manual_seed(0),
                        init_masks=init_m[k : k + 1], init_patterns=init_p[k : k + 1])
        for k in range(K)
    ]
    t_looped = time.perf_counter() - t0
    print(f"\nK={K} tasks x {settings.steps} steps: batched {t_batched:.2f}s, looped {t_looped:.2f}s")

    for k in range(K):
        assert bool(batched.success[k]) == bool(looped[k].success[0]), k
        a, b = float(batched.mask_l1[k]), float(looped[k].mask_l1[0])
        if a == float("inf") or b == float("inf"):
            assert a == b
        else:
            assert a == pytest.approx(b, rel=0.05, abs=0.5), k
        assert float(batched.attack_success_rate[k]) == pytest.approx(
            float(looped[k].attack_success_rate[0]), abs=0.15
        )
    assert bool(batched.success[0])  # 1 -> 0 is the backdoor direction


def test_model_state_restored_and_untouched(poisoned_model, held_out):
    xt, yt = held_out
    model = poisoned_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.c1.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    try:
        with torch.no_grad():  # works even when called under no_grad
            res = invert_triggers(model, [(xt[yt == 1][:4], 0)], InversionSettings(steps=5))
        assert len(res) == 1
        assert model.training
        assert [p.requires_grad for p in model.parameters()] == flags
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k  # incl. BN running stats (eval mode)
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.c1.weight.requires_grad_(True)
        model.eval()


def test_size_cap_and_degenerate_tasks(poisoned_model, held_out):
    xt, yt = held_out
    tasks = [(xt[yt == 1][:8], 0), (xt[:0], 3)]
    settings = InversionSettings(steps=60, max_mask_fraction=1e-3)  # cap 0.256 px
    res = invert_triggers(poisoned_model, tasks, settings, torch.Generator().manual_seed(0))
    # task 0 succeeds but is oversized -> empty
    assert bool(res.oversized[0]) and not bool(res.success[0])
    assert torch.isfinite(res.mask_l1[0]) and float(res.mask_l1[0]) > 1e-3 * H * W
    assert torch.all(res.masks[0] == 0) and torch.all(res.patterns[0] == 0)
    # task without images: never successful
    assert not bool(res.success[1]) and float(res.mask_l1[1]) == float("inf")
    assert float(res.attack_success_rate[1]) == 0.0
    # zero steps: nothing is ever successful
    res0 = invert_triggers(poisoned_model, tasks[:1], InversionSettings(steps=0))
    assert not bool(res0.success[0]) and torch.all(res0.masks == 0)


def test_minibatch_mode_and_determinism(poisoned_model, held_out):
    xt, yt = held_out
    tasks = [(xt[yt != 0][:40], 0), (xt[yt == 2][:10], 7)]
    settings = InversionSettings(steps=40, batch_size=16, max_mask_fraction=CAP)
    r1 = invert_triggers(poisoned_model, tasks, settings, torch.Generator().manual_seed(5))
    r2 = invert_triggers(poisoned_model, tasks, settings, torch.Generator().manual_seed(5))
    assert torch.equal(r1.masks, r2.masks) and torch.equal(r1.mask_l1, r2.mask_l1)
    assert r1.success.dtype == torch.bool and r1.mask_l1.shape == (2,)


def test_empty_warm_start_rows_fall_back_to_neutral_init(poisoned_model, held_out):
    xt, yt = held_out
    tasks = [(xt[yt == 1][:6], 0), (xt[yt == 2][:6], 0)]
    settings = InversionSettings(steps=10, max_mask_fraction=CAP)
    plain = invert_triggers(poisoned_model, tasks, settings, torch.Generator().manual_seed(1))
    zeros = torch.zeros(2, 1, H, W)
    nan_p = torch.full((2, 1, H, W), float("nan"))
    warm = invert_triggers(poisoned_model, tasks, settings, torch.Generator().manual_seed(1),
                           init_masks=zeros, init_patterns=nan_p)
    assert torch.equal(plain.mask_l1, warm.mask_l1) and torch.equal(plain.masks, warm.masks)


def test_summed_cross_entropy_equals_the_mean_at_a_cost_divided_by_the_image_count(poisoned_model, held_out):
    """The official symmetric loss sum_i CE_i + c|m| is n (mean CE + (c/n)|m|): Adam cannot tell them apart."""
    xt, yt = held_out
    n = 8
    tasks = [(xt[yt == 1][:n], 0), (xt[yt == 0][:n], 1)]
    g = torch.Generator().manual_seed(3)
    init_m, init_p = torch.rand(2, 1, H, W, generator=g), torch.rand(2, 1, H, W, generator=g)
    common = dict(steps=40, max_mask_fraction=CAP, reinit_noise=0.0)
    summed = invert_triggers(poisoned_model, tasks, InversionSettings(sum_ce=True, init_cost=1e-2, **common),
                             torch.Generator().manual_seed(0), init_masks=init_m, init_patterns=init_p)
    mean = invert_triggers(poisoned_model, tasks, InversionSettings(init_cost=1e-2 / n, **common),
                           torch.Generator().manual_seed(0), init_masks=init_m, init_patterns=init_p)
    plain = invert_triggers(poisoned_model, tasks, InversionSettings(init_cost=1e-2, **common),
                            torch.Generator().manual_seed(0), init_masks=init_m, init_patterns=init_p)
    assert torch.allclose(summed.best_masks, mean.best_masks, atol=1e-3)
    assert torch.allclose(summed.final_cost, mean.final_cost * n)
    assert not torch.allclose(summed.best_masks, plain.best_masks, atol=1e-3)  # the reduction matters


def test_per_task_initial_costs_and_best_triggers_beyond_the_cap(poisoned_model, held_out):
    xt, yt = held_out
    tasks = [(xt[yt == 1][:8], 0)] * 2
    settings = InversionSettings(steps=30, max_mask_fraction=1e-3, reinit_noise=0.0, patience=1000)
    g = torch.Generator().manual_seed(4)
    init_m = torch.rand(1, 1, H, W, generator=g).repeat(2, 1, 1, 1)
    init_p = torch.rand(1, 1, H, W, generator=g).repeat(2, 1, 1, 1)
    res = invert_triggers(poisoned_model, tasks, settings, torch.Generator().manual_seed(0), init_masks=init_m,
                          init_patterns=init_p, init_costs=torch.tensor([1e-3, 1e-1]))
    assert res.final_cost.tolist() == pytest.approx([1e-3, 1e-1])  # patience never reached: costs kept
    assert float(res.mask_l1[1]) < float(res.mask_l1[0])  # a higher L1 weight shrinks the mask faster
    assert bool(res.oversized.all()) and torch.all(res.masks == 0)  # over the cap: no trigger to stamp ...
    assert torch.isclose(res.best_masks.flatten(1).sum(1), res.mask_l1.float(), rtol=1e-4).all()  # ... but kept
    assert res.steps == 30


def test_early_stop_waits_for_every_task_then_ends_a_stalled_search(poisoned_model, held_out):
    xt, yt = held_out
    tasks = [(xt[yt == 1][:8], 0), (xt[yt == 3][:8], 2)]
    base = dict(steps=400, max_mask_fraction=CAP, reinit_noise=0.0)
    full = invert_triggers(poisoned_model, tasks, InversionSettings(**base), torch.Generator().manual_seed(0))
    early = invert_triggers(poisoned_model, tasks, InversionSettings(stop_patience=10, **base),
                            torch.Generator().manual_seed(0))
    assert full.steps == 400 and 10 <= early.steps < 400 and early.steps % 10 == 0
    assert torch.equal(early.success, full.success)
    # a task that has not succeeded yet keeps the search going (an empty task does not count)
    never = invert_triggers(poisoned_model, [(xt[yt == 1][:8], 0), (xt[:0], 3)],
                            InversionSettings(stop_patience=5, success_threshold=1.01, **{**base, "steps": 40}),
                            torch.Generator().manual_seed(0))
    assert never.steps == 40 and not bool(never.success.any())
