"""The fast FLIP client schedule: one budgeted, batched inversion per round, its triggers reused by every batch.

The official schedule inverts on almost every batch (tens of small inversions of 50-400 steps per
round), so a client's inversion costs hundreds of times its hardening. Here a round runs ONE batched
inversion of every candidate at once, on a small image subset (`flip_defense.fast.images_per_class` local
images per class), continuing from the partition's cached triggers and their final L1 weights:

- the universal trigger of every target (sources: the subset's images of every other class);
- the `flip_defense.fast.pairs` (source, target) pairs with the smallest known triggers (a pair never
  inverted is ranked by its target's universal size), plus `flip_defense.fast.explore_pairs` random pairs.

Its length is a budget, not a step count: `flip_defense.fast.budget` (`warmup_budget` on a first selection,
which has nothing cached) times the images the round's hardening trains on, divided by the images one
inversion step uses, within [`min_steps`, `max_steps`]; it stops early once every trigger has stopped
shrinking (`stop_patience`). Short runs use their own optimiser settings (`flip_defense.fast.inversion_lr`,
`init_cost`, `cost_patience`): the official ones need a few hundred steps to shrink a mask below the cap.
Every trigger found is cached, an oversized one too (the next selection continues from it).

Hardening: the cached triggers within the size cap (found this round, or earlier: a backdoor the model
no longer shows costs little to keep unlearning) stamp `flip_defense.portion` of each batch's eligible images
(non-target images for a universal trigger, source images for a pair), each image one of its eligible
triggers, labels kept, one SGD step (`flip_defense.fast.lr`, `training.momentum`, `training.weight_decay`). SGD
rather than the official Adam: Adam moves every weight by about its learning rate whatever the
gradient, so ten epochs on a small label-skewed partition drag the model away (the official MNIST
Adam 1e-2 costs 5 points of clean accuracy in 10 rounds on `digits`), while SGD's steps follow the
loss, which the stamped images dominate (docs/FLIP.md, "Clean-accuracy drift").
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from flip_fl.config import FastScheduleConfig
from flip_fl.defenses.flip_defense.cache import UNIVERSAL, TriggerCache, random_pair
from flip_fl.defenses.flip_defense.hardening import harden_batch
from flip_fl.defenses.flip_defense.round import FlipRound
from flip_fl.registry import FLIP_SCHEDULES

Direction = tuple[int, int]


def inversion_images(r: FlipRound, per_class: int) -> dict[int, Tensor]:
    """`per_class` random local images of every class the partition has (drawn from the round's stream)."""
    out = {}
    for c in range(r.num_classes):
        idx = torch.nonzero(r.data.labels == c).flatten()
        if len(idx):
            out[c] = r.data.batch(idx[torch.randperm(len(idx), generator=r.streams.invert)[:per_class]])[0]
    return out


def candidate_directions(cache: TriggerCache, classes: list[int], fast: FastScheduleConfig,
                         r: FlipRound) -> list[Direction]:
    """Every target's universal direction, the smallest known pairs among `classes`, then random pairs."""
    pairs = cache.smallest_pairs(fast.pairs, r.streams.pairs, classes)
    for _ in range(100):
        if len(pairs) >= fast.pairs + fast.explore_pairs or not classes:
            break
        pair = random_pair(r.streams.pairs, classes, r.num_classes)
        if pair not in pairs:
            pairs.append(pair)
    return [(UNIVERSAL, t) for t in range(r.num_classes)] + pairs


def inversion_tasks(images: dict[int, Tensor], directions: list[Direction]) -> list[tuple[Tensor, int]]:
    """(source images, target) per direction: every other class's images for a universal one."""
    empty = next(iter(images.values()))[:0]
    return [(torch.cat([images[c] for c in sorted(images) if c != t] or [empty]), t) if s == UNIVERSAL
            else (images[s], t) for s, t in directions]


def inversion_steps(fast: FastScheduleConfig, warm_up: bool, hardening_images: int, images_per_step: int) -> int:
    """Steps the round's budget buys: budget x hardening images / images per step, within the bounds."""
    budget = fast.warmup_budget if warm_up else fast.budget
    steps = int(budget * hardening_images / max(images_per_step, 1))
    return max(fast.min_steps, min(fast.max_steps, steps))


def invert_candidates(r: FlipRound, warm_up: bool) -> None:
    """The round's one batched inversion; every trigger it finds (oversized too) goes into the cache."""
    fast = r.flip.fast
    images = inversion_images(r, fast.images_per_class)
    directions = candidate_directions(r.cache, sorted(images), fast, r)
    tasks = inversion_tasks(images, directions)
    steps = inversion_steps(fast, warm_up, r.hardening_images(), sum(int(x.shape[0]) for x, _ in tasks))
    settings = r.settings(steps, lr=fast.inversion_lr, init_cost=fast.init_cost, patience=fast.cost_patience,
                          stop_patience=fast.stop_patience)
    costs = torch.tensor([r.cache.costs.get(d, fast.init_cost) for d in directions], dtype=torch.float64)
    result = r.invert(tasks, settings, [r.cache.get_trigger(*d) for d in directions], init_costs=costs)
    for k, d in enumerate(directions):
        found = bool(torch.isfinite(result.mask_l1[k]))
        r.cache.record(*d, result.best_masks[k] if found else None, result.best_patterns[k] if found else None,
                       float(result.mask_l1[k]), float(result.final_cost[k]))
    r.stats["flip_triggers_found"] += int(result.success.sum())


def hardening_triggers(r: FlipRound) -> tuple[Tensor, Tensor, list[list[int]]]:
    """The cached triggers within the size cap: masks, patterns and each one's source classes."""
    keys = [k for k, m in r.cache.masks.items() if float(m.sum()) <= r.cap]
    c, h, w = r.data.image_shape
    if not keys:
        return torch.zeros(0, 1, h, w), torch.zeros(0, c, h, w), []
    masks = torch.stack([torch.as_tensor(r.cache.masks[k]) for k in keys])
    patterns = torch.stack([torch.as_tensor(r.cache.patterns[k]) for k in keys])
    sources = [[s for s in range(r.num_classes) if s != t] if src == UNIVERSAL else [src] for src, t in keys]
    return masks, patterns, sources


@FLIP_SCHEDULES.register("fast")
def fast_round(r: FlipRound, warm_up: bool) -> None:
    """One batched inversion of every candidate, then every batch hardened with the cached triggers."""
    invert_candidates(r, warm_up)
    masks, patterns, sources = hardening_triggers(r)
    r.stats["flip_warmup"] = float(warm_up)
    for _, x, y in r.batches():
        start = time.perf_counter()
        x, stamped = harden_batch(x, y, masks, patterns, r.flip.portion, r.streams.stamp, sources=sources)
        r.train(x, y, stamped, start)
    r.cache.warmed_up = True
