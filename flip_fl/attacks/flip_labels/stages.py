"""The FLIP label-only attack's stages that an attacker runs on its own data: experts, then label matching.

`local_flip_labels` is what `clients.FlipLabelClient` computes when it has no label file; the resumable
experiment around these stages (flips, user models, tables: `sim.py labels`) is
`flip_fl.experiments.labels_pipeline`. Each stage writes under a folder and skips what is already there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flip_fl.attacks.flip_labels.augment import AugmentSettings
from flip_fl.attacks.flip_labels.experts import ExpertSettings, load_trajectory, train_expert
from flip_fl.attacks.flip_labels.flips import apply_flips, select_flips
from flip_fl.attacks.flip_labels.matching import MatchSettings, optimize_labels
from flip_fl.attacks.flip_labels.user import LabelScores, UserSettings, evaluate_cta_pta
from flip_fl.attacks.triggers import build_trigger
from flip_fl.config import Config, ConfigError, FlipLabelsConfig
from flip_fl.data import ImageDataset
from flip_fl.models import build_model

DONE = "done.json"
"""The file that marks a finished expert."""


@dataclass
class LabelTask:
    """Everything the stages need: data on the device, the model factory, the trigger and the class pair."""

    x: Tensor
    y: Tensor
    model_fn: Callable[[], torch.nn.Module]
    trigger: Callable[[Tensor], Tensor]
    source: int
    target: int
    settings: FlipLabelsConfig


def all_on(data: ImageDataset, device: torch.device) -> tuple[Tensor, Tensor]:
    """All of `data` as (images, labels) on `device`."""
    x, y = data.batch(np.arange(len(data)))
    return x.to(device), y.to(device)


def make_task(cfg: Config, data: ImageDataset, device: torch.device) -> LabelTask:
    """A LabelTask over all of `data` (a whole training set, or one client's partition)."""
    trigger = build_trigger(cfg.attack, data.image_shape)
    return LabelTask(*all_on(data, device), lambda: build_model(cfg.model, data).to(device),
                     lambda images: trigger.apply(images), cfg.attack.source_label, cfg.attack.target_label,
                     cfg.flip_labels)


def _augment(s: FlipLabelsConfig) -> AugmentSettings:
    return AugmentSettings(enabled=s.augment)


def expert_settings(s: FlipLabelsConfig) -> ExpertSettings:
    """Expert training from `flip_labels.*`."""
    return ExpertSettings(epochs=s.expert_epochs, batch_size=s.batch_size, lr=s.expert_lr,
                          weight_decay=s.expert_weight_decay, augment=_augment(s),
                          checkpoint_every=s.checkpoint_every, n_poison_copies=s.poison_copies)


def match_settings(s: FlipLabelsConfig) -> MatchSettings:
    """Trajectory matching from `flip_labels.*`."""
    return MatchSettings(passes=s.passes, batch_size=s.batch_size, label_lr=s.label_lr,
                         label_momentum=s.label_momentum, n_poison_copies=s.poison_copies, augment=_augment(s))


def user_settings(s: FlipLabelsConfig) -> UserSettings:
    """User-model training from `flip_labels.*` (lr x0.1 at 3/8 and 5/8 of the epochs)."""
    milestones = tuple(sorted({max(1, round(s.user_epochs * f)) for f in (3 / 8, 5 / 8)}))
    return UserSettings(epochs=s.user_epochs, batch_size=s.batch_size, lr=s.user_lr,
                        lr_milestones=milestones, augment=_augment(s))


def budget_name(budget: int | float) -> str:
    """File-name form of a budget: '150' for a count, '0.03' for a fraction."""
    return str(budget)


def progress_printer(log: Callable[[str], None], every: float = 0.1) -> Callable[[dict[str, Any]], None]:
    """A progress callback that logs about every `every` of a stage's steps."""
    def report(event: dict[str, Any]) -> None:
        step, total = int(event["step"]), int(event["total"])
        if step == total or step % max(1, int(total * every)) == 0:
            loss = f" loss {event['loss']:.4f}" if "loss" in event else ""
            log(f"  {event['stage']}: step {step}/{total}{loss}")
    return report


def describe_scores(scores: LabelScores) -> str:
    """One line of a model's clean and poison test accuracy."""
    return f"CTA {scores.cta:.4f} PTA {scores.pta:.4f} (no trigger {scores.pta_clean:.4f})"


def run_experts(task: LabelTask, out: Path, generator: torch.Generator, log: Callable[[str], None],
                test: ImageDataset | None = None) -> None:
    """Train the experts not yet done; with `test`, score each (did it learn the trigger?) into done.json."""
    test_tensors = None if test is None else all_on(test, task.x.device)
    for e in range(task.settings.num_experts):
        folder = out / "experts" / f"expert_{e}"
        if (folder / DONE).is_file():
            continue
        if folder.exists():
            for stale in folder.glob("step_*.pt"):
                stale.unlink()
        log(f"experts: training expert {e + 1}/{task.settings.num_experts}")
        expert = train_expert(task.model_fn, task.x, task.y, task.trigger, task.source, task.target,
                              expert_settings(task.settings), folder, generator, progress_printer(log))
        record: dict[str, Any] = {"checkpoints": expert.checkpoint_steps}
        if test_tensors is not None:
            scores = evaluate_cta_pta(expert.model, *test_tensors, task.trigger, task.source, task.target)
            record["test"] = scores._asdict()
            log(f"experts: expert {e + 1}: {describe_scores(scores)}")
        (folder / DONE).write_text(json.dumps(record))


def trajectory(task: LabelTask, out: Path) -> list:
    """All experts' checkpoints within flip_labels.trajectory_fraction (requires the experts stage)."""
    lo, hi = task.settings.trajectory_fraction
    folders = [out / "experts" / f"expert_{e}" for e in range(task.settings.num_experts)]
    missing = [str(f) for f in folders if not (f / DONE).is_file()]
    if missing:
        raise ConfigError(f"expert trajectories missing ({', '.join(missing)}): run --stage experts first")
    return [c for f in folders for c in load_trajectory(f, (lo, hi), map_location=task.x.device)]


def run_labels(task: LabelTask, out: Path, generator: torch.Generator, log: Callable[[str], None]) -> None:
    """Optimise the label logits of every label run not yet done (requires the experts stage)."""
    checkpoints = None
    for r in range(task.settings.label_runs):
        path = out / "labels" / f"logits_{r}.pt"
        if path.is_file():
            continue
        checkpoints = checkpoints or trajectory(task, out)
        log(f"labels: trajectory matching run {r + 1}/{task.settings.label_runs} over {len(checkpoints)} checkpoints")
        logits = optimize_labels(task.model_fn, checkpoints, task.x, task.y, task.trigger, task.source,
                                 task.target, match_settings(task.settings), generator, progress_printer(log))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(logits.cpu(), path)


def load_logits(task: LabelTask, out: Path) -> list[Tensor]:
    """The label logits of every label run (requires the labels stage)."""
    paths = [out / "labels" / f"logits_{r}.pt" for r in range(task.settings.label_runs)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"label logits missing ({', '.join(missing)}): run --stage labels first")
    return [torch.load(p, map_location="cpu", weights_only=True) for p in paths]


def local_flip_labels(cfg: Config, data: ImageDataset, workdir: Path, device: torch.device) -> np.ndarray:
    """An attacker's own FLIP labels for its local data (experts, matching, flips at flip_labels.client_budget)."""
    task = make_task(cfg, data, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    quiet: Callable[[str], None] = lambda _: None  # noqa: E731
    run_experts(task, workdir, generator, quiet)
    run_labels(task, workdir, generator, quiet)
    logits = load_logits(task, workdir)
    indices, new = select_flips(logits, task.y.cpu(), cfg.flip_labels.client_budget)
    return apply_flips(task.y.cpu(), indices, new).numpy()
