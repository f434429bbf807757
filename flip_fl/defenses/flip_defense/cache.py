"""The FLIP client's persistent trigger cache: trigger sizes per (source, target), triggers, warm-up flag.

It is the state a benign client keeps across rounds (its `ClientState`, which travels with each TRAIN message
and reply and is saved in the run's checkpoints; never a module global: Ray actors serve many partitions).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

UNIVERSAL = -1
"""Source index of a universal (every source) trigger in `TriggerCache` keys."""


def _unknown(*shape: int) -> np.ndarray:
    return np.full(shape, np.nan, dtype=np.float64)


@dataclass
class TriggerCache:
    """Per-client FLIP state, persistent across rounds.

    * `mask_sizes[s, t]` (num_classes x num_classes, float64): last measured `|m|_1` of a pair
      trigger s -> t. `NaN` = never inverted as a pair, `inf` = inverted without success.
    * `universal_sizes[t]`: last measured size of the universal (every source) trigger of `t`;
      a pair never measured is ranked by it (`pair_sizes`).
    * `masks` / `patterns`: triggers keyed by `(source, target)` (`source == UNIVERSAL` for the
      universal ones), masks [1, H, W] and patterns [C, H, W] float32 in [0, 1], used as warm starts;
      the dicts are ordered from least to most recently stored.
    * `warmed_up`: the first selection's warm-up has been done.
    """

    num_classes: int
    mask_sizes: np.ndarray = None  # type: ignore[assignment]
    universal_sizes: np.ndarray = None  # type: ignore[assignment]
    masks: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    patterns: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    costs: dict[tuple[int, int], float] = field(default_factory=dict)
    warmed_up: bool = False

    def __post_init__(self) -> None:
        n = self.num_classes
        self.mask_sizes = _unknown(n, n) if self.mask_sizes is None else np.asarray(self.mask_sizes, np.float64)
        self.universal_sizes = (_unknown(n) if self.universal_sizes is None
                                else np.asarray(self.universal_sizes, np.float64))
        if self.mask_sizes.shape != (n, n) or self.universal_sizes.shape != (n,):
            raise ValueError("mask_sizes must be num_classes x num_classes and universal_sizes num_classes long")

    def record(self, source: int, target: int, mask: np.ndarray | Tensor | None,
               pattern: np.ndarray | Tensor | None, size: float, cost: float | None = None) -> None:
        """Store one inversion's size (`inf`: no success) and, when it succeeded, its trigger.

        `cost` (the L1 weight the inversion ended with) is kept beside the trigger as its warm start.
        """
        if source == UNIVERSAL:
            self.universal_sizes[target] = float(size)
        elif source != target:
            self.mask_sizes[source, target] = float(size)
        if mask is not None and pattern is not None and np.isfinite(size):
            key = (int(source), int(target))
            for store in (self.masks, self.patterns, self.costs):
                store.pop(key, None)  # re-inserted: the dicts stay ordered from least to most recently stored
            self.masks[key] = _np32(mask)
            self.patterns[key] = _np32(pattern)
            if cost is not None:
                self.costs[key] = float(cost)

    def prune(self, max_pairs: int) -> None:
        """Keep at most `max_pairs` pair triggers (the most recently stored); universal ones stay."""
        pairs = [k for k in self.masks if k[0] != UNIVERSAL]
        for k in pairs[: max(len(pairs) - max_pairs, 0)]:
            del self.masks[k], self.patterns[k]
            self.costs.pop(k, None)

    def get_trigger(self, source: int, target: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Cached trigger for (source, target), falling back to the universal one of target."""
        for key in ((int(source), int(target)), (UNIVERSAL, int(target))):
            if key in self.masks:
                return self.masks[key], self.patterns[key]
        return None

    def pair_sizes(self) -> np.ndarray:
        """Pair sizes for ranking: measured ones, else the target's universal size; the diagonal NaN."""
        sizes = np.where(np.isnan(self.mask_sizes), self.universal_sizes[None, :], self.mask_sizes)
        np.fill_diagonal(sizes, np.nan)
        return sizes

    def smallest_pairs(self, k: int, rng: np.random.Generator, sources: Iterable[int],
                       avoid_source: int | None = None) -> list[tuple[int, int]]:
        """Up to `k` pairs with the smallest finite known size among `sources` (ties at random).

        A small trigger is the Neural Cleanse signature of a backdoor ("promising pairs" of the paper).
        Pairs whose source is `avoid_source` are left out (the official code takes a new source each time).
        """
        src = sorted({int(s) for s in sources if 0 <= int(s) < self.num_classes})
        sizes = self.pair_sizes()[src] if src else np.empty((0, self.num_classes))
        cand = [(float(sizes[i, t]), float(rng.random()), s, t) for i, s in enumerate(src)
                for t in range(self.num_classes) if np.isfinite(sizes[i, t])]
        cand.sort()
        return [(s, t) for _, _, s, t in cand if s != avoid_source][:k]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat dict of numpy arrays (for a Flower `ArrayRecord`), triggers in storage order."""
        keys = list(self.masks)
        out: dict[str, np.ndarray] = {
            "num_classes": np.asarray(self.num_classes, dtype=np.int64),
            "mask_sizes": self.mask_sizes.copy(),
            "universal_sizes": self.universal_sizes.copy(),
            "warmed_up": np.asarray(self.warmed_up, dtype=np.bool_),
            "keys": np.asarray(keys, dtype=np.int64).reshape(len(keys), 2),
            "costs": np.asarray([self.costs.get(k, np.nan) for k in keys], dtype=np.float64),
            "masks": np.stack([self.masks[k] for k in keys]) if keys else np.zeros((0,), np.float32),
            "patterns": np.stack([self.patterns[k] for k in keys]) if keys else np.zeros((0,), np.float32),
        }
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> TriggerCache:
        """The cache `to_arrays` wrote (float16 triggers come back as float32)."""
        keys = [(int(k[0]), int(k[1])) for k in np.asarray(arrays["keys"]).reshape(-1, 2)]
        return cls(num_classes=int(arrays["num_classes"]),
                   mask_sizes=np.array(arrays["mask_sizes"], dtype=np.float64),
                   universal_sizes=np.array(arrays["universal_sizes"], dtype=np.float64),
                   masks={k: np.array(arrays["masks"][i], dtype=np.float32) for i, k in enumerate(keys)},
                   patterns={k: np.array(arrays["patterns"][i], dtype=np.float32) for i, k in enumerate(keys)},
                   costs={k: float(c) for k, c in zip(keys, np.asarray(arrays["costs"])) if np.isfinite(c)},
                   warmed_up=bool(arrays["warmed_up"]))


def random_pair(rng: np.random.Generator, sources: Sequence[int], num_classes: int) -> tuple[int, int]:
    """A uniformly random source among `sources` and a uniformly random other target."""
    s = int(sources[int(rng.integers(len(sources)))])
    t = int(rng.integers(num_classes - 1))
    return s, t + 1 if t >= s else t


def _np32(a: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return np.array(a, dtype=np.float32)
