"""Step 4 of FLIP: the victim ("user") trains from scratch on clean images with the attacker's labels.

Hard vs soft labels is decided by the targets passed to `train_user_model`, never by a
default: int64 `(N,)` class ids (crowd-sourced labels, e.g. from
`flip_labels_at_budgets`) train with cross-entropy; float `N x C`
probabilities (knowledge distillation, from `soft_labels`) train with soft cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import augment
from .common import ModelFn, Progress, TrainSettings, Trigger, build_model, sgd_train, source_mask


@dataclass(frozen=True)
class UserSettings(TrainSettings):
    """`TrainSettings` with the paper's user-model schedule (200 epochs, lr x0.1 at 75, 125)."""

    epochs: int = 200
    lr_milestones: tuple[int, ...] = (75, 125)


def soft_labels(logits: Tensor, y: Tensor, alpha: float) -> Tensor:
    """Distillation targets `softmax(alpha * one_hot(y) + (1 - alpha) * logits)` (`N x C`)."""
    one_hot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return torch.softmax(alpha * one_hot + (1 - alpha) * logits, dim=1)


def train_user_model(
    model_fn: ModelFn,
    x: Tensor,
    targets: Tensor,
    settings: TrainSettings,
    generator: torch.Generator,
    progress: Progress | None = None,
) -> nn.Module:
    """Train a fresh model on `(x, targets)`; returns it in eval mode.

    `targets`: int64 `(N,)` hard labels or float `N x C` soft labels (rows summing to 1).
    """
    if targets.dtype == torch.long and targets.dim() == 1:
        pass
    elif targets.is_floating_point() and targets.dim() == 2:
        if not torch.allclose(targets.sum(dim=1), torch.ones(len(targets), device=targets.device,
                                                              dtype=targets.dtype), atol=1e-4):
            raise ValueError("soft targets must be probability rows (did you pass raw logits?)")
    else:
        raise ValueError("targets must be int64 (N,) hard labels or float (N, C) probabilities")
    if len(targets) != len(x):
        raise ValueError(f"{len(targets)} targets for {len(x)} images")
    targets = targets.to(x.device)
    model = build_model(model_fn, generator, x.device)

    def make_batch(items: Tensor) -> tuple[Tensor, Tensor]:
        items = items.to(x.device)
        return augment(x[items], settings.augment, generator), targets[items]

    sgd_train(model, len(x), make_batch, settings, generator, progress=progress, stage="user")
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Eval-mode class predictions (the model's train/eval mode is restored)."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]).argmax(dim=1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


class LabelScores(NamedTuple):
    """Scores of a model trained on (possibly poisoned) labels, fractions in [0, 1].

    `pta_clean` is the part of `pta` that needs no trigger: relabelling many images of the
    source class teaches a model to confuse the class with the target even on clean images, so
    only `pta - pta_clean` is a backdoor.
    """

    cta: float
    pta: float
    pta_clean: float


def evaluate_cta_pta(
    model: nn.Module,
    x_test: Tensor,
    y_test: Tensor,
    apply_trigger: Trigger,
    source: int,
    target: int,
    batch_size: int = 1024,
) -> LabelScores:
    """Clean test accuracy (CTA), poison test accuracy (PTA) and PTA without the trigger.

    CTA: accuracy on the clean test set. PTA: fraction of triggered test images of the source
    class (every non-target class when `source == -1`) predicted as `target`. PTA clean: the
    same fraction on those images without the trigger.
    """
    cta = (predict(model, x_test, batch_size) == y_test).float().mean().item()
    carriers = x_test[source_mask(y_test, source, target)]
    if len(carriers) == 0:
        raise ValueError(f"no test image of source class {source}")
    stamped = torch.cat([apply_trigger(carriers[i : i + batch_size])
                         for i in range(0, len(carriers), batch_size)])
    pta = (predict(model, stamped, batch_size) == target).float().mean().item()
    pta_clean = (predict(model, carriers, batch_size) == target).float().mean().item()
    return LabelScores(cta, pta, pta_clean)
