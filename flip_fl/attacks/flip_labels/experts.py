"""Step 1 of FLIP: train expert models on poisoned data and record their trajectories.

An expert trains on the clean images (true labels) plus `P` triggered copies of source-class
images labelled `target` (`P = N // num_classes` by default, as in the paper: 5000 for CIFAR-10).
Model state *and* optimizer state are saved at step 0, every `checkpoint_every` minibatches, and
at the final step, as `step_XXXXXXXXX.pt` files (zero-padded, so names sort by step) holding
`{"step": int, "model": state_dict, "optimizer": optimizer.state_dict()}`. The files load with
`torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .common import (
    ModelFn,
    Progress,
    TrainSettings,
    Trigger,
    build_model,
    num_classes_of,
    poisoned_data,
    sgd_train,
    steps_per_epoch,
)

_NAME = re.compile(r"^step_(\d+)\.pt$")


@dataclass(frozen=True)
class ExpertSettings(TrainSettings):
    """`TrainSettings` (defaults = FLIP expert recipe) plus trajectory recording.

    `n_poison_copies=None` means `len(x) // num_classes`.
    """

    checkpoint_every: int = 50
    n_poison_copies: int | None = None


@dataclass
class Checkpoint:
    """One saved step of an expert: model and optimizer state."""

    step: int
    model_state: dict[str, Tensor]
    optimizer_state: dict


@dataclass
class Expert:
    """A trained expert, its optimizer and the steps saved to disk."""

    model: nn.Module
    optimizer: torch.optim.SGD
    checkpoint_steps: list[int]


def checkpoint_steps(total_steps: int, every: int) -> list[int]:
    """Steps at which `train_expert` saves: 0, every, 2*every, ... and `total_steps`."""
    steps = list(range(0, total_steps + 1, every))
    if steps[-1] != total_steps:
        steps.append(total_steps)
    return steps


def train_expert(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    apply_trigger: Trigger,
    source: int,
    target: int,
    settings: ExpertSettings,
    checkpoint_dir: str | Path,
    generator: torch.Generator,
    progress: Progress | None = None,
) -> Expert:
    """Train one expert, writing its trajectory to `checkpoint_dir`.

    Raises ValueError if `checkpoint_dir` already holds checkpoints.

    Total steps = `epochs * ceil((N + P) / batch_size)`. Returns the trained model, its optimizer
    and the saved step ids.
    """
    if settings.checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {settings.checkpoint_every}")
    out_dir = Path(checkpoint_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(_NAME.match(p.name) for p in out_dir.iterdir()):
        raise ValueError(f"checkpoint_dir {out_dir} already holds a trajectory; use an empty directory")

    model = build_model(model_fn, generator, x.device)
    data = poisoned_data(x, y, apply_trigger, source, target, settings.n_poison_copies, num_classes_of(model, x),
                         generator)

    total = settings.epochs * steps_per_epoch(len(data), settings.batch_size)
    wanted = set(checkpoint_steps(total, settings.checkpoint_every))
    saved: list[int] = []

    def on_step(step: int, opt: torch.optim.SGD) -> None:
        if step in wanted:
            torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict()},
                       out_dir / f"step_{step:09d}.pt")
            saved.append(step)

    def make_batch(items: Tensor) -> tuple[Tensor, Tensor]:
        xb, yb, _, _ = data.batch(items, settings.augment, generator)
        return xb, yb

    opt = sgd_train(model, len(data), make_batch, settings, generator, on_step, progress, "expert")
    return Expert(model=model, optimizer=opt, checkpoint_steps=saved)


def load_trajectory(
    checkpoint_dir: str | Path,
    fraction: tuple[float, float] = (0.0, 1.0),
    map_location: str | torch.device = "cpu",
) -> list[Checkpoint]:
    """Checkpoints of one expert sorted by step, loaded with `weights_only=True`.

    `fraction=(lo, hi)` keeps only steps in `[lo * last, hi * last]` (`last` = largest saved
    step) without loading the others; the official code matched from epochs 1-15 of 20, i.e.
    roughly `(0.05, 0.75)`.
    """
    found = sorted(
        (int(m.group(1)), p)
        for p in Path(checkpoint_dir).iterdir()
        if (m := _NAME.match(p.name))
    )
    if not found:
        raise FileNotFoundError(f"no step_*.pt checkpoint in {checkpoint_dir}")
    last = found[-1][0]
    lo, hi = fraction
    out = []
    for step, path in found:
        if math.ceil(lo * last) <= step <= math.floor(hi * last):
            blob = torch.load(path, map_location=map_location, weights_only=True)
            out.append(Checkpoint(step=int(blob["step"]), model_state=blob["model"],
                                  optimizer_state=blob["optimizer"]))
    return out
