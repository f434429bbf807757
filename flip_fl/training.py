"""Local training and batched prediction loops shared by every client and the server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from flip_fl.data import ImageDataset

BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
StepHook = Callable[[int], None]


def batch_indices(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Index tensors of consecutive minibatches over `n` samples (last one may be short)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    yield from order.split(batch_size)


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """Plain SGD over all trainable parameters."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_epochs(model: nn.Module, data: ImageDataset, optimizer: torch.optim.Optimizer, *, epochs: int,
                 batch_size: int, device: torch.device, generator: torch.Generator,
                 max_batches: int | None = None, transform: BatchTransform | None = None,
                 on_epoch_end: Callable[[int], None] | None = None,
                 after_step: StepHook | None = None) -> dict[str, float]:
    """Cross-entropy SGD over `data` in train mode; returns mean loss and the number of steps.

    `transform(x, y)` rewrites each batch (poisoning, hardening); `after_step(step)` runs after every
    optimiser step (e.g. a norm projection); `max_batches` caps the steps of the whole call.
    """
    model.train()
    total, steps = 0.0, 0
    for epoch in range(epochs):
        for idx in batch_indices(len(data), batch_size, generator):
            if max_batches is not None and steps >= max_batches:
                break
            x, y = data.batch(idx)
            if transform is not None:
                x, y = transform(x, y)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
            if after_step is not None:
                after_step(steps)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return {"train_loss": total / max(steps, 1), "train_steps": float(steps)}


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
