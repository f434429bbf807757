"""FLIP hardening step and the per-client trigger cache.

Hardening (reference, "Hardening"): in each trained batch a fraction `portion` of the
*eligible* images is replaced by its stamped version `clip((1-m) x + m p, 0, 1)`; labels stay
the TRUE labels, so the model unlearns the trigger -> target shortcut.

`TriggerCache` is the state a benign client keeps across rounds (in Flower: in
`context.state` or a store keyed by partition id, never a module global).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from flip_fl.defenses.flip.inversion import stamp

__all__ = ["harden_batch", "TriggerCache", "UNIVERSAL"]

UNIVERSAL = -1
"""Source index used in `TriggerCache` keys for a universal (all-sources) trigger."""


# long: rewritten for issue 12 (Fast FLIP)
def harden_batch(
    x: Tensor,
    y: Tensor,
    masks: Tensor,
    patterns: Tensor,
    portion: float,
    generator: torch.Generator | None = None,
    sources: Sequence[Iterable[int]] | None = None,
    targets: Sequence[int] | None = None,
) -> tuple[Tensor, int]:
    """Stamp a fraction `portion` of the eligible images of a batch with inverted triggers.

    Args:
        x: batch [B, C, H, W] in [0, 1]; not modified.
        y: true labels [B]; not modified (hardening keeps the true labels).
        masks: [T, 1, H, W] (or [T, C, H, W]) masks in [0, 1].
        patterns: [T, C, H, W].
        portion: fraction in [0, 1] of the eligible images to stamp;
            `count = floor(portion * n_eligible)` (as `int(len * portion)` in the official
            code).
        generator: CPU `torch.Generator` for the choice of images and triggers.
        sources: per trigger, the source classes it applies to (e.g. `[s]` for a pair
            trigger s->t, or all classes != t for a universal one).  If `None`: derived from
            `targets` (all classes != target); if both are `None` every image is eligible
            for every trigger.
        targets: per-trigger target class, only used when `sources` is `None`.

    A trigger whose mask is all zeros (an empty / failed inversion) is never used.  An image
    is eligible if its label is a source of at least one usable trigger; the `count` stamped
    images are drawn uniformly without replacement among the eligible ones, and each gets a
    trigger drawn uniformly among the usable triggers it is eligible for.

    Returns:
        `(x2, count)`: a new tensor (stamped rows clipped to [0, 1], other rows identical
        to `x`) and the number of images stamped.
    """
    if not 0.0 <= portion <= 1.0:
        raise ValueError("portion must be in [0, 1]")
    x2 = x.clone()
    T = int(masks.shape[0])
    B = int(x.shape[0])
    if T == 0 or B == 0 or portion == 0.0:
        return x2, 0
    if patterns.shape[0] != T:
        raise ValueError("masks and patterns must have the same number of triggers")
    if sources is not None and len(sources) != T:
        raise ValueError("sources must give one class list per trigger")
    if sources is None and targets is not None and len(targets) != T:
        raise ValueError("targets must give one class per trigger")

    y_cpu = y.detach().to("cpu", torch.long)
    usable = masks.detach().flatten(1).abs().sum(1).cpu() > 0  # [T]
    elig = torch.zeros(B, T, dtype=torch.bool)  # image b may take trigger j
    for j in range(T):
        if not bool(usable[j]):
            continue
        if sources is not None:
            src = torch.tensor(sorted({int(c) for c in sources[j]}), dtype=torch.long)
            elig[:, j] = torch.isin(y_cpu, src) if src.numel() else False
        elif targets is not None:
            elig[:, j] = y_cpu != int(targets[j])
        else:
            elig[:, j] = True
    eligible = torch.nonzero(elig.any(1)).flatten()
    count = int(len(eligible) * portion)
    if count == 0:
        return x2, 0

    chosen = eligible[torch.randperm(len(eligible), generator=generator)[:count]]
    # uniform choice among each chosen image's eligible triggers
    w = elig[chosen].double()
    trig = torch.multinomial(w, 1, generator=generator).flatten()

    dev = x.device
    ci, tj = chosen.to(dev), trig.to(dev)
    m = masks.detach().to(dev, x.dtype)[tj]
    p = patterns.detach().to(dev, x.dtype)[tj]
    x2[ci] = stamp(x[ci], m, p).clamp(0.0, 1.0)
    return x2, count


def _empty_sizes(n: int) -> np.ndarray:
    return np.full((n, n), np.nan, dtype=np.float64)


@dataclass
class TriggerCache:
    """Per-client FLIP state, persistent across rounds.

    * `mask_sizes[s, t]` (num_classes x num_classes, float64): last known `|m|_1` of a
      trigger flipping class s to t.  `NaN` = never inverted (unknown), `inf` = inverted
      but no trigger within the size cap was found; the diagonal stays NaN.
    * `masks` / `patterns`: keyed by `(source, target)`; `source == UNIVERSAL (-1)`
      for the per-target universal triggers of the warm-up.  Masks are [1, H, W], patterns
      [C, H, W] float32 arrays in [0, 1] (usable as warm starts for the next inversion).
    * `warmed_up`: the cached warm-up (one universal inversion per target) has been done.
    """

    num_classes: int
    mask_sizes: np.ndarray = None  # type: ignore[assignment]
    masks: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    patterns: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    warmed_up: bool = False

    def __post_init__(self) -> None:
        if self.mask_sizes is None:
            self.mask_sizes = _empty_sizes(self.num_classes)
        self.mask_sizes = np.asarray(self.mask_sizes, dtype=np.float64)
        if self.mask_sizes.shape != (self.num_classes, self.num_classes):
            raise ValueError("mask_sizes must be num_classes x num_classes")

    # ------------------------------------------------------------------ updates
    def record(
        self,
        source: int,
        target: int,
        mask: np.ndarray | Tensor | None,
        pattern: np.ndarray | Tensor | None,
        size: float,
    ) -> None:
        """Store the outcome of one inversion.

        `source` may be `UNIVERSAL`; then `size` is written to every
        `mask_sizes[s, target]`, s != target.  `size` should be `inf` for an inversion
        that found no usable trigger; in that case (or when `mask` is None) the stored
        trigger for the key is left unchanged.
        """
        rows = [s for s in range(self.num_classes) if s != target] if source == UNIVERSAL else [source]
        for s in rows:
            if s != target:
                self.mask_sizes[s, target] = float(size)
        if mask is not None and pattern is not None and np.isfinite(size):
            key = (int(source), int(target))
            self.masks.pop(key, None)  # re-insert: the dicts stay ordered from least to most recently stored
            self.patterns.pop(key, None)
            self.masks[key] = _np32(mask)
            self.patterns[key] = _np32(pattern)

    def prune(self, max_pairs: int) -> None:
        """Keep at most `max_pairs` pair triggers (the most recently stored); universal ones stay."""
        pairs = [k for k in self.masks if k[0] != UNIVERSAL]
        for k in pairs[: max(len(pairs) - max_pairs, 0)]:
            del self.masks[k], self.patterns[k]

    def get_trigger(self, source: int, target: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Cached trigger for (source, target), falling back to the universal one of target."""
        for key in ((int(source), int(target)), (UNIVERSAL, int(target))):
            if key in self.masks:
                return self.masks[key], self.patterns[key]
        return None

    # ------------------------------------------------------------------ scheduling
    def select_pair(
        self,
        rng: np.random.Generator,
        explore: float = 0.3,
        sources: Iterable[int] | None = None,
    ) -> tuple[int, int]:
        """Pick the next (source, target) pair to invert.

        With probability `explore` (reference: 30 %) a uniformly random pair s != t.
        Otherwise exploit: the pair with the smallest known, finite `mask_sizes[s, t]`
        (the most "promising" one: a small trigger is the signature of a backdoor), ties
        broken uniformly at random; if no finite size is known, a random pair.  The caller
        must update `mask_sizes` after each inversion (the size of the newly inverted
        trigger, or `inf`), so that once a pair has been hardened and its trigger grows,
        the greedy choice moves on.

        `sources` optionally restricts the source class (e.g. to the classes present in
        the batch, as the official code does); the target may be any other class.

        Note: the official code sorts its `mat_diff` matrix in DESCENDING order (warm-up
        mask sizes normalised by their max, later relative size changes); the reference
        only says "prioritise promising pairs".  Smallest-size-first is our documented
        reading.
        """
        n = self.num_classes
        src = list(range(n)) if sources is None else sorted({int(s) for s in sources if 0 <= int(s) < n})
        if not src:
            raise ValueError("no admissible source class")
        if n < 2:
            raise ValueError("need at least two classes")
        if rng.random() >= explore:
            sub = self.mask_sizes[src]  # [len(src), n]
            valid = np.isfinite(sub)
            for i, s in enumerate(src):
                valid[i, s] = False
            if valid.any():
                best = np.min(sub[valid])
                cand = np.argwhere(valid & (sub == best))
                i, t = cand[rng.integers(len(cand))]
                return int(src[i]), int(t)
        s = int(src[rng.integers(len(src))])
        t = int(rng.integers(n - 1))
        if t >= s:
            t += 1
        return s, t

    # ------------------------------------------------------------------ persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat dict of numpy arrays (e.g. for `np.savez` or a Flower `ArrayRecord`), in storage order."""
        keys = list(self.masks)
        out: dict[str, np.ndarray] = {
            "num_classes": np.asarray(self.num_classes, dtype=np.int64),
            "mask_sizes": self.mask_sizes.copy(),
            "warmed_up": np.asarray(self.warmed_up, dtype=np.bool_),
            "keys": np.asarray(keys, dtype=np.int64).reshape(len(keys), 2),
        }
        if keys:
            out["masks"] = np.stack([self.masks[k] for k in keys])
            out["patterns"] = np.stack([self.patterns[k] for k in keys])
        else:
            out["masks"] = np.zeros((0,), dtype=np.float32)
            out["patterns"] = np.zeros((0,), dtype=np.float32)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> TriggerCache:
        """Inverse of `to_arrays`."""
        keys = [tuple(int(v) for v in k) for k in np.asarray(arrays["keys"]).reshape(-1, 2)]
        masks = {k: np.array(arrays["masks"][i], dtype=np.float32) for i, k in enumerate(keys)}
        patterns = {k: np.array(arrays["patterns"][i], dtype=np.float32) for i, k in enumerate(keys)}
        return cls(
            num_classes=int(arrays["num_classes"]),
            mask_sizes=np.array(arrays["mask_sizes"], dtype=np.float64),
            masks=masks,  # type: ignore[arg-type]
            patterns=patterns,  # type: ignore[arg-type]
            warmed_up=bool(arrays["warmed_up"]),
        )


def _np32(a: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return np.array(a, dtype=np.float32)
