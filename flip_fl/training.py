"""The one SGD loop (clients, the FLTrust server, the FLIP label attack) and batched prediction.

`sgd_epochs` is the loop; `train_epochs` runs it over an `ImageDataset` and `LocalTraining` is benign
local training with the `training.*` settings. The FLIP label attack (`flip_fl.attacks.flip_labels`) runs the
same loop over its poisoned tensors with `even_batches` and soft targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flip_fl.config import TrainingConfig
from flip_fl.data.dataset import ImageDataset

BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
MakeBatch = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Batches = Callable[[int, int, torch.Generator], Iterable[torch.Tensor]]
AfterStep = Callable[[int, float], None]


def batch_indices(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Index tensors of consecutive minibatches of `batch_size` over `n` samples (the last one may be short)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    yield from order.split(batch_size)


def even_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random permutation of `range(n)` cut into `ceil(n / batch_size)` near-equal minibatches.

    Every item is used and no batch is tiny (the FLIP label attack's batching).
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n_items >= 1 and batch_size >= 1, got {n}, {batch_size}")
    perm = torch.randperm(n, generator=generator)
    return list(torch.tensor_split(perm, math.ceil(n / batch_size)))


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float, nesterov: bool = False) -> torch.optim.SGD:
    """SGD over all trainable parameters (one parameter group, in `named_parameters` order)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of `-sum_c targets[c] * log_softmax(logits)[c]`."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on int64 class ids, soft cross-entropy on `B x C` probabilities."""
    return F.cross_entropy(logits, targets) if targets.dtype == torch.long else soft_cross_entropy(logits, targets)


def sgd_epochs(model: nn.Module, optimizer: torch.optim.Optimizer, n_items: int, make_batch: MakeBatch, *,
               epochs: int, batch_size: int, generator: torch.Generator, batches: Batches = batch_indices,
               device: torch.device | None = None, max_batches: int | None = None,
               after_step: AfterStep | None = None,
               on_epoch_end: Callable[[int], None] | None = None) -> dict[str, float]:
    """Train `model` in train mode; returns the mean loss and the number of steps.

    Each epoch draws minibatch indices with `batches(n_items, batch_size, generator)`; `make_batch(indices)`
    returns `(inputs, targets)` (targets: class ids or probabilities, see `classification_loss`), moved to
    `device` when given. `after_step(step, loss)` runs after every optimiser step (e.g. a norm projection or
    a checkpoint), `on_epoch_end(epoch)` after every epoch (e.g. an lr scheduler); `max_batches` caps the
    steps of the whole call.
    """
    model.train()
    total, steps = 0.0, 0
    for epoch in range(epochs):
        for idx in batches(n_items, batch_size, generator):
            if max_batches is not None and steps >= max_batches:
                break
            x, y = make_batch(idx)
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = classification_loss(model(x), y)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            total += value
            steps += 1
            if after_step is not None:
                after_step(steps, value)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return {"train_loss": total / max(steps, 1), "train_steps": float(steps)}


def train_epochs(model: nn.Module, data: ImageDataset, optimizer: torch.optim.Optimizer, *, epochs: int,
                 batch_size: int, device: torch.device, generator: torch.Generator,
                 max_batches: int | None = None, transform: BatchTransform | None = None,
                 on_epoch_end: Callable[[int], None] | None = None,
                 after_step: AfterStep | None = None) -> dict[str, float]:
    """Cross-entropy SGD over `data` (`sgd_epochs`); `transform(x, y)` rewrites each batch (poisoning)."""
    def make_batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data.batch(idx)
        return transform(x, y) if transform is not None else (x, y)

    return sgd_epochs(model, optimizer, len(data), make_batch, epochs=epochs, batch_size=batch_size,
                      generator=generator, device=device, max_batches=max_batches, after_step=after_step,
                      on_epoch_end=on_epoch_end)


@dataclass(frozen=True)
class LocalTraining:
    """Benign local training: the `training.*` settings (SGD, epochs, batch size, batch cap)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    max_batches: int | None = None

    @classmethod
    def from_config(cls, training: TrainingConfig) -> LocalTraining:
        """The benign training of `training.*`."""
        return cls(training.local_epochs, training.batch_size, training.lr, training.momentum, training.weight_decay,
                   training.max_batches)

    def run(self, model: nn.Module, data: ImageDataset, device: torch.device,
            generator: torch.Generator) -> dict[str, float]:
        """Train `model` (already on `device`) on `data`; returns the training metrics."""
        optimizer = sgd(model, self.lr, self.momentum, self.weight_decay)
        return train_epochs(model, data, optimizer, epochs=self.epochs, batch_size=self.batch_size, device=device,
                            generator=generator, max_batches=self.max_batches)


@torch.no_grad()
def predict_probs(model: nn.Module, data: ImageDataset, device: torch.device, batch_size: int,
                  transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Softmax probabilities (N x classes, on CPU) of `model` in eval mode over `data`."""
    model.eval()
    out = []
    for idx in batch_indices(len(data), batch_size, torch.Generator(), shuffle=False):
        x, _ = data.batch(idx)
        if transform is not None:
            x = transform(x)
        out.append(F.softmax(model(x.to(device)), dim=1).float().cpu())
    return torch.cat(out) if out else torch.empty(0, data.num_classes)


def state_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's state_dict."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
