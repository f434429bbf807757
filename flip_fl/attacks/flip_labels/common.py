"""Pieces shared by expert training, label matching and user training.

Conventions used across `flip_fl.labels`:

* Images are `N x C x H x W` float tensors in `[0, 1]`; all computation happens on `x.device`
  (the model built by `model_fn` is moved there). Normalisation, if wanted, belongs in the model.
* `apply_trigger(x)` takes a batch `B x C x H x W` and returns a stamped copy.
* `source` is a class id or `-1` for "every class except the target".
* Randomness (shuffling, poison-copy choice, augmentation, checkpoint choice) comes from a CPU
  `torch.Generator`; model initialisation is seeded from it too (see `build_model`), so a
  fixed generator seed reproduces a run on a fixed device.
* A dataset of `M` items is cut each epoch into `ceil(M / batch_size)` near-equal minibatches
  (`flip_fl.training.even_batches`): every item is used, no batch is tiny, and any `M >= 2` works
  (the official code dropped the last batch and assumed >= 201 batches per epoch).
* Training runs the one SGD loop of flip-fl, `flip_fl.training.sgd_epochs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flip_fl.training import even_batches, sgd, sgd_epochs

from .augment import AugmentSettings, paired_augment

ModelFn = Callable[[], nn.Module]
Trigger = Callable[[Tensor], Tensor]
# Called with a dict such as `{"stage": "expert", "step": 10, "total": 200, "loss": 0.7}`.
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainSettings:
    """SGD training of a classifier (used for experts and user models).

    Defaults: the FLIP expert recipe (SGD lr 0.1, momentum 0.9, Nesterov, wd 2e-4, batch 256,
    20 epochs, crop-4/flip augmentation). `lr_milestones` are epochs at which the lr is multiplied
    by `lr_gamma` (`MultiStepLR`); empty means a constant lr.
    """

    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 2e-4
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    augment: AugmentSettings = field(default_factory=AugmentSettings)


def build_model(model_fn: ModelFn, generator: torch.Generator, device: torch.device) -> nn.Module:
    """Call `model_fn` with the global CPU RNG seeded from `generator` (state restored after)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        model = model_fn()
    return model.to(device)


def num_classes_of(model: nn.Module, x: Tensor) -> int:
    """Output width of `model` (one eval-mode forward on two images; no state changes)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        width = model(x[:2]).shape[1]
    model.train(was_training)
    return int(width)


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    """Minibatches per epoch of `n_items` items (`ceil(n_items / batch_size)`)."""
    return math.ceil(n_items / batch_size)


def source_mask(y: Tensor, source: int, target: int) -> Tensor:
    """Images eligible as trigger carriers: class `source`, or every non-target class if -1."""
    return y != target if source == -1 else y == source


def poison_source_indices(
    y: Tensor, source: int, target: int, n_copies: int, generator: torch.Generator
) -> Tensor:
    """Indices (CPU int64) of the images whose triggered copies join the poisoned training set.

    Drawn without replacement from the source-class images; when `n_copies` exceeds their number
    every image is used `n_copies // n_source` times plus a random subset for the remainder.
    """
    candidates = torch.nonzero(source_mask(y.cpu(), source, target)).flatten()
    if n_copies == 0:
        return candidates[:0]
    if len(candidates) == 0:
        raise ValueError(f"no training image of source class {source} (target {target})")
    full, rest = divmod(n_copies, len(candidates))
    extra = candidates[torch.randperm(len(candidates), generator=generator)[:rest]]
    return torch.cat([candidates.repeat(full), extra])


def poisoned_data(x: Tensor, y: Tensor, apply_trigger: Trigger, source: int, target: int, n_copies: int | None,
                  num_classes: int, generator: torch.Generator) -> PoisonedData:
    """The expert's training set: the clean images plus `n_copies` triggered source-class copies.

    `n_copies=None` means one class's worth, `len(x) // num_classes` (5000 for CIFAR-10, as in the paper).
    """
    if n_copies is None:
        n_copies = len(x) // num_classes
    return PoisonedData(x, y, poison_source_indices(y, source, target, n_copies, generator), apply_trigger, target)


class PoisonedData:
    """The expert's training set: `N` clean items followed by `P` triggered copies.

    Item `j < N` is clean image `j` with label `y[j]`; item `N + i` is
    `apply_trigger(x[copy_of[i]])` labelled `target`. `clean_index(items)` maps every item to
    its clean image (and so to the label logit it belongs to in trajectory matching).
    """

    def __init__(self, x: Tensor, y: Tensor, copy_of: Tensor, apply_trigger: Trigger, target: int):
        self.x, self.y, self.apply_trigger, self.target = x, y, apply_trigger, target
        self.copy_of = copy_of.to(x.device)

    def __len__(self) -> int:
        return len(self.x) + len(self.copy_of)

    def clean_index(self, items: Tensor) -> Tensor:
        """The clean image (and label logit) each item belongs to."""
        n = len(self.x)
        items = items.to(self.x.device)
        if len(self.copy_of) == 0:
            return items
        return torch.where(items < n, items, self.copy_of[(items - n).clamp(min=0)])

    def batch(
        self, items: Tensor, augment: AugmentSettings, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`(x_poisoned, y_poisoned, x_clean, clean_index)` for `items`.

        `x_poisoned` has the trigger stamped on copy items (before augmentation, as in the
        reference: the trigger goes through the crop/flip), `x_clean` is the same images without
        the trigger; both views share one augmentation draw.
        """
        items = items.to(self.x.device)
        idx = self.clean_index(items)
        is_copy = items >= len(self.x)
        x_clean = self.x[idx]
        x_pois = x_clean.clone()
        if bool(is_copy.any()):
            x_pois[is_copy] = self.apply_trigger(x_clean[is_copy]).to(x_pois.dtype)
        y_pois = torch.where(is_copy, torch.full_like(self.y[idx], self.target), self.y[idx])
        x_pois, x_clean = paired_augment((x_pois, x_clean), augment, generator)
        return x_pois, y_pois, x_clean, idx


def sgd_train(
    model: nn.Module,
    n_items: int,
    make_batch: Callable[[Tensor], tuple[Tensor, Tensor]],
    settings: TrainSettings,
    generator: torch.Generator,
    on_step: Callable[[int, torch.optim.SGD], None] | None = None,
    progress: Progress | None = None,
    stage: str = "train",
) -> torch.optim.SGD:
    """Train `model` in place with `settings` on the SGD loop of `flip_fl.training`; returns the optimizer.

    `make_batch(items) -> (x, targets)`; `targets` are int64 class ids (cross-entropy) or `B x C`
    probabilities (soft cross-entropy). Batches are `even_batches`. `on_step(step, optimizer)` runs before
    the first update (step 0) and after every update (step = number of updates done so far).
    """
    opt = sgd(model, settings.lr, settings.momentum, settings.weight_decay, settings.nesterov)
    sched = (
        torch.optim.lr_scheduler.MultiStepLR(opt, list(settings.lr_milestones), settings.lr_gamma)
        if settings.lr_milestones
        else None
    )
    per_epoch = steps_per_epoch(n_items, settings.batch_size)
    total = settings.epochs * per_epoch
    model.train()
    if on_step is not None:
        on_step(0, opt)

    def after_step(step: int, loss: float) -> None:
        if on_step is not None:
            on_step(step, opt)
        if progress is not None:
            progress({"stage": stage, "epoch": (step - 1) // per_epoch, "step": step, "total": total, "loss": loss})

    sgd_epochs(model, opt, n_items, make_batch, epochs=settings.epochs, batch_size=settings.batch_size,
               generator=generator, batches=even_batches, after_step=after_step,
               on_epoch_end=(lambda _: sched.step()) if sched is not None else None)
    return opt
