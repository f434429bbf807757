"""What one FLIP client round shares between its inversions and its hardening steps.

`FlipRound` holds the model being hardened, its Adam optimiser, the client's data and trigger cache,
the round's random streams, and the per-round statistics; both schedules (`flip_fl.defenses.flip_defense.official`,
`flip_fl.defenses.flip_defense.fast`) are written against it. Timings split the round into inversion and hardening.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flip_fl.config import FlipDefenseConfig
from flip_fl.data import ImageDataset
from flip_fl.defenses.flip_defense.cache import TriggerCache
from flip_fl.defenses.flip_defense.inversion import InversionResult, InversionSettings, Task, invert_triggers
from flip_fl.training import batch_indices

Trigger = tuple[Tensor, Tensor]
STAT_NAMES = ("invert_seconds", "harden_seconds", "flip_warmup", "flip_inversions", "flip_inversion_steps",
              "flip_inversion_images", "flip_directions", "flip_triggers_found", "flip_images_stamped",
              "flip_batches_trained", "flip_batches_skipped")


@dataclass
class RoundStreams:
    """The round's independent random streams (each a seeded CPU generator; pairs drawn with numpy)."""

    batches: torch.Generator
    invert: torch.Generator
    stamp: torch.Generator
    pairs: np.random.Generator


def hardening_images(n: int, batch_size: int, epochs: int, max_batches: int | None) -> int:
    """Images the hardening loop trains on: `epochs` passes in batches of `batch_size`, at most `max_batches`."""
    per_epoch = math.ceil(n / batch_size) if n else 0
    total = epochs * per_epoch if max_batches is None else min(epochs * per_epoch, max_batches)
    full_epochs, rest = divmod(total, per_epoch) if per_epoch else (0, 0)
    return full_epochs * n + min(rest * batch_size, n)


class FlipRound:
    """One FLIP client round: the model, its hardening optimiser (new every round), data, cache, streams, statistics."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: ImageDataset, flip: FlipDefenseConfig,
                 cache: TriggerCache, device: torch.device, streams: RoundStreams, batch_size: int) -> None:
        self.model, self.optimizer, self.data, self.flip, self.cache = model, optimizer, data, flip, cache
        self.device, self.streams, self.batch_size = device, streams, batch_size
        self.stats = dict.fromkeys(STAT_NAMES, 0.0)
        self.loss_sum = 0.0
        self.cap = flip.max_mask_fraction * data.image_shape[1] * data.image_shape[2]

    @property
    def num_classes(self) -> int:
        """Classes of the client's dataset."""
        return self.data.num_classes

    def batches(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(step, images, labels) over `flip_defense.local_epochs` shuffled epochs.

        At most `flip_defense.max_batches` batches in all.
        """
        step = 0
        for _ in range(self.flip.local_epochs):
            for idx in batch_indices(len(self.data), self.batch_size, self.streams.batches):
                if self.flip.max_batches is not None and step >= self.flip.max_batches:
                    return
                yield step, *self.data.batch(idx)
                step += 1

    def hardening_images(self) -> int:
        """Images this round's hardening will train on (the unit of the fast schedule's budget)."""
        return hardening_images(len(self.data), self.batch_size, self.flip.local_epochs, self.flip.max_batches)

    def settings(self, steps: int, **overrides: object) -> InversionSettings:
        """Inversion hyperparameters from `flip_defense.*` for a call of `steps` steps."""
        f = self.flip
        base = InversionSettings(steps=steps, init_cost=f.init_cost, success_threshold=f.success_threshold,
                                 max_mask_fraction=f.max_mask_fraction, reinit_noise=f.reinit_noise)
        return replace(base, **overrides)  # type: ignore[arg-type]

    def invert(self, tasks: Sequence[Task], settings: InversionSettings,
               starts: Sequence[Trigger | tuple[np.ndarray, np.ndarray] | None],
               init_costs: Tensor | None = None) -> InversionResult:
        """One batched inversion call, warm-started from `starts`, timed into `invert_seconds`."""
        begin = time.perf_counter()
        init_m, init_p = self.warm_starts(starts)
        result = invert_triggers(self.model, tasks, settings, self.streams.invert, init_masks=init_m,
                                 init_patterns=init_p, init_costs=init_costs)
        self.stats["invert_seconds"] += time.perf_counter() - begin
        self.stats["flip_inversions"] += 1
        self.stats["flip_directions"] += len(tasks)
        self.stats["flip_inversion_steps"] += result.steps
        self.stats["flip_inversion_images"] += result.steps * sum(int(x.shape[0]) for x, _ in tasks)
        return result

    def warm_starts(self, starts: Sequence[Trigger | tuple[np.ndarray, np.ndarray] | None]) -> Trigger:
        """Stacked initial masks [N, 1, H, W] and patterns [N, C, H, W]; zeros (neutral start) where None."""
        c, h, w = self.data.image_shape
        init_m, init_p = torch.zeros(len(starts), 1, h, w), torch.zeros(len(starts), c, h, w)
        for k, start in enumerate(starts):
            if start is not None:
                init_m[k], init_p[k] = torch.as_tensor(start[0]), torch.as_tensor(start[1])
        return init_m, init_p

    def train(self, x: Tensor, y: Tensor, stamped: int, since: float) -> None:
        """One Adam step on the (stamped) batch with its true labels, model in train mode.

        `since` is when the batch's stamping began: stamping and the step count as hardening time.
        """
        self.model.train()
        x, y = x.to(self.device), y.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += float(loss.detach())
        self.stats["flip_images_stamped"] += stamped
        self.stats["flip_batches_trained"] += 1
        self.stats["harden_seconds"] += time.perf_counter() - since

    def skip(self) -> None:
        """A batch the schedule does not train on."""
        self.stats["flip_batches_skipped"] += 1

    def metrics(self) -> dict[str, float]:
        """The round's statistics plus `train_loss` and `train_steps` (trained batches)."""
        steps = self.stats["flip_batches_trained"]
        return {**self.stats, "train_loss": self.loss_sum / max(steps, 1.0), "train_steps": steps}
