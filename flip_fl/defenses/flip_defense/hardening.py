"""FLIP hardening: stamp inverted triggers on part of a batch whose labels stay the true ones.

Training on `clip((1 - m) x + m p, 0, 1)` under the true label makes the model unlearn the
trigger -> target shortcut (reference, "Hardening"). Two ways to choose the stamped images:

- `harden_batch`: `floor(portion * n_eligible)` images among every image some trigger applies to,
  each with one of its triggers (the fast schedule; our earlier reading of the official code);
- `stamp_counts`: a given count per trigger among its own source images (the official code's
  per-side counts: `int(min(n_s, n_t) * portion)` on each side of a symmetric pair).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from flip_fl.defenses.flip_defense.inversion import stamp


def eligibility(y: Tensor, masks: Tensor, sources: Sequence[Iterable[int]] | None = None,
                targets: Sequence[int] | None = None) -> Tensor:
    """[B, T] booleans: image b may take trigger j (its label is a source of j, and j's mask is not empty).

    Sources default to every class but `targets[j]`; without either, every image may take every trigger.
    """
    n_triggers = int(masks.shape[0])
    if sources is not None and len(sources) != n_triggers:
        raise ValueError("sources must give one class list per trigger")
    if sources is None and targets is not None and len(targets) != n_triggers:
        raise ValueError("targets must give one class per trigger")
    labels = y.detach().to("cpu", torch.long)
    usable = masks.detach().flatten(1).abs().sum(1).cpu() > 0
    elig = torch.zeros(len(labels), n_triggers, dtype=torch.bool)
    for j in range(n_triggers):
        if not bool(usable[j]):
            continue
        if sources is not None:
            classes = torch.tensor(sorted({int(c) for c in sources[j]}), dtype=torch.long)
            elig[:, j] = torch.isin(labels, classes)
        elif targets is not None:
            elig[:, j] = labels != int(targets[j])
        else:
            elig[:, j] = True
    return elig


def harden_batch(x: Tensor, y: Tensor, masks: Tensor, patterns: Tensor, portion: float,
                 generator: torch.Generator | None = None, sources: Sequence[Iterable[int]] | None = None,
                 targets: Sequence[int] | None = None) -> tuple[Tensor, int]:
    """Stamp a fraction `portion` of the eligible images of a batch with inverted triggers.

    Args:
        x: Batch [B, C, H, W] in [0, 1]; not modified.
        y: True labels [B]; not modified (hardening keeps the true labels).
        masks: [T, 1, H, W] (or [T, C, H, W]) masks in [0, 1]; an all-zero mask is never used.
        patterns: [T, C, H, W] patterns.
        portion: Fraction in [0, 1] of the eligible images to stamp: `floor(portion * n_eligible)`.
        generator: CPU generator for the choice of images and triggers.
        sources: Per trigger, the classes it applies to (`[s]` for a pair s->t, every class but t
            for a universal trigger); see `eligibility` for the defaults.
        targets: Per trigger, its target class (used only without `sources`).

    Returns:
        A new batch (stamped rows clipped to [0, 1], the other rows identical to `x`) and the number of
        images stamped. Stamped images are drawn uniformly without replacement among the eligible ones;
        each takes a trigger drawn uniformly among those it is eligible for.
    """
    if not 0.0 <= portion <= 1.0:
        raise ValueError("portion must be in [0, 1]")
    if patterns.shape[0] != masks.shape[0]:
        raise ValueError("masks and patterns must have the same number of triggers")
    x2 = x.clone()
    if masks.shape[0] == 0 or x.shape[0] == 0 or portion == 0.0:
        return x2, 0
    elig = eligibility(y, masks, sources, targets)
    eligible = torch.nonzero(elig.any(1)).flatten()
    count = int(len(eligible) * portion)
    if count == 0:
        return x2, 0
    chosen = eligible[torch.randperm(len(eligible), generator=generator)[:count]]
    trigger = torch.multinomial(elig[chosen].double(), 1, generator=generator).flatten()
    rows, which = chosen.to(x.device), trigger.to(x.device)
    m = masks.detach().to(x.device, x.dtype)[which]
    p = patterns.detach().to(x.device, x.dtype)[which]
    x2[rows] = stamp(x[rows], m, p).clamp(0.0, 1.0)
    return x2, count


def stamp_counts(x: Tensor, y: Tensor, triggers: Sequence[tuple[Tensor, Tensor, Iterable[int], int]],
                 generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """Stamp, for each `(mask, pattern, classes, count)`, `count` images whose label is in `classes`.

    The official code's per-side stamping: a symmetric pair stamps `int(min(n_s, n_t) * portion)` images
    of each side with that side's trigger, a universal trigger `int(portion * n_non_target)` images.
    Images are drawn without replacement among those not stamped yet (labels never change); stamped
    rows are clipped to [0, 1]. Returns the new batch and the number of images stamped.
    """
    x2 = x.clone()
    labels = y.detach().to("cpu", torch.long)
    taken = torch.zeros(len(labels), dtype=torch.bool)
    for mask, pattern, classes, count in triggers:
        wanted = torch.tensor(sorted({int(c) for c in classes}), dtype=torch.long)
        pool = torch.nonzero(torch.isin(labels, wanted) & ~taken).flatten()
        chosen = pool[torch.randperm(len(pool), generator=generator)[:max(int(count), 0)]]
        if len(chosen) == 0:
            continue
        taken[chosen] = True
        rows = chosen.to(x.device)
        x2[rows] = stamp(x[rows], mask.to(x.device, x.dtype), pattern.to(x.device, x.dtype)).clamp(0.0, 1.0)
    return x2, int(taken.sum())
