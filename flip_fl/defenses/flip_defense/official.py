"""The official FLIP client schedule (KaiyuanZh/FLIP, `trigger_fast_train`), batch by batch.

A round walks the hardening batches (`FlipRound.batches`); a class is *present* in a batch when it
has more than `flip_defense.size_min` images there, and a batch with no present class is skipped.

- Warm-up (a partition's first selection): batch t of the first `num_classes` batches inverts the
  universal trigger of target t (`flip_defense.warmup_steps` steps, sources: `flip_defense.samples_per_class` local
  images of every other class, on the model hardened so far, no size cap), stamps
  `int(portion * n_non_target)` of the batch's non-target images with it and takes one step.
- Pair windows: a new (source, target) pair on every batch of the first ten, then every
  `flip_defense.pair_every` batches: with probability `flip_defense.explore` a random pair (source present), otherwise
  the smallest known trigger with a present source other than the last one.
  - Both classes present (and `flip_defense.symmetric`): s->t and t->s in one call whose cross-entropy is
    summed over each side's images; `int(min(n_s, n_t) * portion)` images of each side are stamped.
    The first batch of a window runs `flip_defense.pair_steps` at `flip_defense.init_cost`; the next runs
    `flip_defense.repeat_steps` at `flip_defense.repeat_cost` if no direction failed so far, else `pair_steps` again.
  - Only the source present: s->t alone (mean cross-entropy) with the window's current steps and
    cost, `int(n_s * portion)` source images stamped; nothing is trained when that count is 0.
  - A batch whose pair trigger exceeds the size cap is skipped, as is a batch without its source.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flip_fl.data import ImageDataset
from flip_fl.defenses.flip_defense.cache import UNIVERSAL, random_pair
from flip_fl.defenses.flip_defense.hardening import stamp_counts
from flip_fl.defenses.flip_defense.round import FlipRound, Trigger
from flip_fl.registry import FLIP_SCHEDULES

Direction = tuple[int, int]


@dataclass
class PairWindow:
    """The pair a window of batches hardens, with the steps and cost of its next inversion."""

    source: int
    target: int
    steps: int
    cost: float
    failures: int = 0
    previous: dict[Direction, Trigger] = field(default_factory=dict)


def warmup_images(data: ImageDataset, per_class: int, size_min: int) -> dict[int, Tensor]:
    """The first `per_class` local images of every class with more than `size_min` images."""
    out = {}
    for c in range(data.num_classes):
        idx = torch.nonzero(data.labels == c).flatten()
        if len(idx) > size_min:
            out[c] = data.batch(idx[:per_class])[0]
    return out


@FLIP_SCHEDULES.register("official")
def official_round(r: FlipRound, warm_up: bool) -> None:
    """Invert and harden batch by batch as the official code does (see the module docstring)."""
    f, n = r.flip, r.num_classes
    extra = warmup_images(r.data, f.samples_per_class, f.size_min) if warm_up else {}
    targets = iter(range(n))
    window: PairWindow | None = None
    for step, x, y in r.batches():
        counts = torch.bincount(y, minlength=n)
        present = [c for c in range(n) if int(counts[c]) > f.size_min]
        if not present:
            r.skip()
            continue
        if warm_up and step < n:
            warmup_batch(r, x, y, next(targets), extra)
            continue
        first = (step - n) % (1 if step < n else f.pair_every) == 0
        if first:
            window = open_window(r, present, window)
        if window is None:
            r.skip()
            continue
        pair_batch(r, window, x, y, counts, first)
    r.cache.warmed_up = True


def warmup_batch(r: FlipRound, x: Tensor, y: Tensor, target: int, extra: dict[int, Tensor]) -> None:
    """Invert the universal trigger of `target`, stamp the batch's non-target images with it, train."""
    sources = [c for c in sorted(extra) if c != target]
    ok = False
    if sources:
        images = torch.cat([extra[c] for c in sources])
        settings = r.settings(r.flip.warmup_steps, max_mask_fraction=1.0)  # no cap in the official warm-up
        result = r.invert([(images, target)], settings, [r.cache.get_trigger(UNIVERSAL, target)])
        ok = bool(result.success[0])
        r.cache.record(UNIVERSAL, target, result.masks[0] if ok else None, result.patterns[0] if ok else None,
                       float(result.mask_l1[0]))
        r.stats["flip_triggers_found"] += int(ok)
    start = time.perf_counter()
    stamped = 0
    if ok:
        others = [c for c in range(r.num_classes) if c != target]
        count = int(int((y != target).sum()) * r.flip.portion)
        x, stamped = stamp_counts(x, y, [(result.masks[0], result.patterns[0], others, count)], r.streams.stamp)
    r.stats["flip_warmup"] = 1.0
    r.train(x, y, stamped, start)


def open_window(r: FlipRound, present: list[int], last: PairWindow | None) -> PairWindow | None:
    """The next window's pair: random with probability `flip_defense.explore`, else the smallest known trigger.

    The exploited pair's source must differ from the last window's (as in the official code); when no
    other present source is left the batch is skipped. Without any known size the pair is random.
    """
    f = r.flip
    rng = r.streams.pairs
    if rng.random() < f.explore:
        pair: Direction | None = random_pair(rng, present, r.num_classes)
    else:
        avoid = last.source if last is not None else None
        best = r.cache.smallest_pairs(1, rng, present, avoid_source=avoid)
        others = [s for s in present if s != avoid]
        pair = best[0] if best else (random_pair(rng, others, r.num_classes) if others else None)
    if pair is None:
        return None
    return PairWindow(source=pair[0], target=pair[1], steps=f.pair_steps, cost=f.init_cost)


def pair_batch(r: FlipRound, w: PairWindow, x: Tensor, y: Tensor, counts: Tensor, first: bool) -> None:
    """One batch of a pair window: symmetric or one-direction inversion, per-side stamping, one step."""
    f = r.flip
    s, t = w.source, w.target
    n_s, n_t = int(counts[s]), int(counts[t])
    if n_s <= f.size_min:
        r.skip()
        return
    symmetric = f.symmetric and n_t > f.size_min
    if symmetric and not first:
        w.steps, w.cost = (f.pair_steps, f.init_cost) if w.failures else (f.repeat_steps, f.repeat_cost)
        w.failures = 0
    length = int(min(n_s, n_t) * f.portion) if symmetric else int(n_s * f.portion)
    if not symmetric and length == 0:
        r.skip()
        return
    directions = [(s, t), (t, s)] if symmetric else [(s, t)]
    found: dict[Direction, Trigger] = {}
    if length > 0:
        found, oversized = invert_pair(r, w, x, y, directions, sum_ce=symmetric)
        if oversized:
            r.skip()
            return
        w.previous = found
    start = time.perf_counter()
    x, stamped = stamp_counts(x, y, [(m, p, [d[0]], length) for d, (m, p) in found.items()], r.streams.stamp)
    r.train(x, y, stamped, start)


def invert_pair(r: FlipRound, w: PairWindow, x: Tensor, y: Tensor, directions: list[Direction],
                sum_ce: bool) -> tuple[dict[Direction, Trigger], bool]:
    """Invert the window's directions on this batch; returns the triggers found and whether one is oversized."""
    tasks = [(x[y == s], t) for s, t in directions]
    starts = [w.previous.get(d) or r.cache.get_trigger(*d) for d in directions]
    result = r.invert(tasks, r.settings(w.steps, init_cost=w.cost, sum_ce=sum_ce), starts)
    found = {}
    for k, d in enumerate(directions):
        ok = bool(result.success[k])
        r.cache.record(*d, result.masks[k] if ok else None, result.patterns[k] if ok else None,
                       float(result.mask_l1[k]))
        if ok:
            found[d] = (result.masks[k], result.patterns[k])
    w.failures += len(directions) - len(found) - int(result.oversized.sum())
    r.stats["flip_triggers_found"] += len(found)
    return found, bool(result.oversized.any())
