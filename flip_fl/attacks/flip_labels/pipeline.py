"""The FLIP label-only attack as resumable stages: experts -> labels -> flips -> user.

Each stage writes under the run directory and is skipped when its outputs are already there, so a
run can be resumed or continued stage by stage (`python sim.py labels --stage ...`):

    experts/expert_<e>/step_*.pt    model + optimizer state every flip_labels.checkpoint_every batches
    labels/logits_<r>.pt            optimised label logits (N x classes) of label run r
    flips/labels_<budget>.npy       the training labels with that budget's flips applied
    flips/indices_<budget>.npy      the flipped sample ids (most negative margin first)
    user/results.csv, results.md    budget -> clean test accuracy (CTA), poison test accuracy (PTA) and
                                    PTA without the trigger, for FLIP flips and the baselines
    timings.json                    seconds per stage
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flip_fl.attacks.flip_labels import (
    AugmentSettings,
    ExpertSettings,
    LabelScores,
    MatchSettings,
    UserSettings,
    apply_flips,
    evaluate_cta_pta,
    load_trajectory,
    matched_random_flips,
    optimize_labels,
    random_flips,
    select_flips,
    soft_labels,
    train_expert,
    train_user_model,
)
from flip_fl.attacks.triggers import build_trigger
from flip_fl.config import Config, ConfigError, FlipLabelsConfig
from flip_fl.data import ImageDataset
from flip_fl.device import torch_device
from flip_fl.models import build_model
from flip_fl.seeds import label_stage_seed
from flip_fl.tables import markdown_table, write_csv

STAGES = ("experts", "labels", "flips", "user")
DONE = "done.json"


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
    """Expert training from `labels.*`."""
    return ExpertSettings(epochs=s.expert_epochs, batch_size=s.batch_size, lr=s.expert_lr,
                          weight_decay=s.expert_weight_decay, augment=_augment(s),
                          checkpoint_every=s.checkpoint_every, n_poison_copies=s.poison_copies)


def match_settings(s: FlipLabelsConfig) -> MatchSettings:
    """Trajectory matching from `labels.*`."""
    return MatchSettings(passes=s.passes, batch_size=s.batch_size, label_lr=s.label_lr,
                         label_momentum=s.label_momentum, n_poison_copies=s.poison_copies, augment=_augment(s))


def user_settings(s: FlipLabelsConfig) -> UserSettings:
    """User-model training from `labels.*` (lr x0.1 at 3/8 and 5/8 of the epochs)."""
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
            log(f"experts: expert {e + 1}: {_describe(scores)}")
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


def run_flips(task: LabelTask, out: Path, log: Callable[[str], None]) -> None:
    """Select and save the flips of every budget (requires the labels stage)."""
    logits = load_logits(task, out)
    y = task.y.cpu()
    folder = out / "flips"
    folder.mkdir(parents=True, exist_ok=True)
    for budget in task.settings.budgets:
        indices, new = select_flips(logits, y, budget)
        labels = apply_flips(y, indices, new)
        np.save(folder / f"labels_{budget_name(budget)}.npy", labels.numpy())
        np.save(folder / f"indices_{budget_name(budget)}.npy", indices.numpy())
        to_target = int((labels[indices] == task.target).sum())
        log(f"flips: budget {budget}: {len(indices)} flips, {to_target} of them to the target class")


def _train_and_score(task: LabelTask, targets: Tensor, x_test: Tensor, y_test: Tensor,
                     generator: torch.Generator) -> LabelScores:
    model = train_user_model(task.model_fn, task.x, targets.to(task.x.device), user_settings(task.settings), generator)
    return evaluate_cta_pta(model, x_test, y_test, task.trigger, task.source, task.target)


def _row(budget: int | float | str, flips: int, kind: str, scores: LabelScores) -> dict[str, Any]:
    return {"budget": budget, "flips": flips, "labels": kind, "cta": scores.cta, "pta": scores.pta,
            "pta_clean": scores.pta_clean}


def _describe(scores: LabelScores) -> str:
    return f"CTA {scores.cta:.4f} PTA {scores.pta:.4f} (no trigger {scores.pta_clean:.4f})"


def _baselines(task: LabelTask, y: Tensor, indices: Tensor, new_labels: Tensor,
               generator: torch.Generator) -> list[tuple[str, str, tuple[Tensor, Tensor]]]:
    """The enabled random controls for a label set that changed `indices` to `new_labels`."""
    out = []
    if task.settings.random_baseline:
        out.append(("random", "random flips to the target", random_flips(y, len(indices), task.target, generator)))
    if task.settings.matched_baseline:
        out.append(("random-same-class", "random flips of the same classes to the same labels",
                    matched_random_flips(y, indices, new_labels, generator)))
    return out


def _label_sets(task: LabelTask, out: Path, y: Tensor) -> list[tuple[int | float | str, str, Tensor, Tensor]]:
    """(budget, kind, training targets, flipped ids) of every distinct label set the user models train on.

    Hard labels: one set per budget. Soft labels: one set in all, `softmax(alpha*onehot + (1-alpha)*logits)` over
    every image whatever the budget (training it once per budget would repeat one experiment under different
    names); its "flips" are the images whose most likely soft label is not the true one.
    """
    if task.settings.soft:
        logits = torch.stack(load_logits(task, out)).mean(0).to(y.device)
        targets = soft_labels(logits, y, task.settings.alpha)
        return [("soft", f"flip-soft alpha={task.settings.alpha:g}", targets,
                 (targets.argmax(dim=1) != y).nonzero().flatten())]
    sets: list[tuple[int | float | str, str, Tensor, Tensor]] = []
    for budget in task.settings.budgets:
        name = budget_name(budget)
        labels = torch.from_numpy(np.load(out / "flips" / f"labels_{name}.npy")).to(y.device)
        indices = torch.from_numpy(np.load(out / "flips" / f"indices_{name}.npy")).to(y.device)
        sets.append((budget, "flip", labels, indices))
    return sets


def run_user(task: LabelTask, out: Path, test: ImageDataset, generator: torch.Generator,
             log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Train user models on the clean labels, each distinct FLIP label set and the baselines; write the table."""
    x_test, y_test = all_on(test, task.x.device)
    y = task.y
    scores = _train_and_score(task, y, x_test, y_test, generator)
    rows = [_row(0, 0, "clean", scores)]
    log(f"user: clean labels: {_describe(scores)}")
    for budget, kind, targets, indices in _label_sets(task, out, y):
        n_flips = len(indices)
        scores = _train_and_score(task, targets, x_test, y_test, generator)
        rows.append(_row(budget, n_flips, kind, scores))
        log(f"user: {kind} labels, budget {budget} ({n_flips} flips): {_describe(scores)}")
        new_labels = targets[indices] if targets.dim() == 1 else targets[indices].argmax(dim=1)
        for name, what, (idx, new) in _baselines(task, y, indices, new_labels, generator):
            scores = _train_and_score(task, apply_flips(y, idx, new), x_test, y_test, generator)
            rows.append(_row(budget, n_flips, name, scores))
            log(f"user: budget {budget}, {n_flips} {what}: {_describe(scores)}")
    write_table(out / "user", rows)
    return rows


def write_table(folder: Path, rows: list[dict[str, Any]]) -> None:
    """results.csv and a markdown table budget -> CTA / PTA."""
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "results.csv", rows)
    lines = markdown_table(["budget", "flips", "labels", "CTA", "PTA", "PTA without trigger"],
                           [[str(r["budget"]), str(r["flips"]), str(r["labels"]), f"{100 * r['cta']:.2f}",
                             f"{100 * r['pta']:.2f}", f"{100 * r['pta_clean']:.2f}"] for r in rows])
    (folder / "results.md").write_text("\n".join(lines) + "\n")


def stage_outputs(stage: str, settings: FlipLabelsConfig, out: Path) -> list[Path]:
    """The files a finished stage leaves in `out` that later stages read."""
    if stage == "experts":
        return [out / "experts" / f"expert_{e}" / DONE for e in range(settings.num_experts)]
    if stage == "labels":
        return [out / "labels" / f"logits_{r}.pt" for r in range(settings.label_runs)]
    if stage == "flips":
        return [out / "flips" / f"{kind}_{budget_name(b)}.npy" for b in settings.budgets
                for kind in ("labels", "indices")]
    return []


def check_stage_inputs(cfg: Config, out: Path, stages: list[str]) -> None:
    """Before anything runs: every stage finds what it reads, in `out` or from a stage run before it now."""
    s = cfg.flip_labels
    for stage in stages:
        inputs = {"labels": ["experts"], "flips": ["labels"], "user": ["flips"] + ["labels"] * s.soft}.get(stage, [])
        if stage == "labels" and all(p.is_file() for p in stage_outputs("labels", s, out)):
            inputs = []  # every label run is done: the stage has nothing to compute
        for before in inputs:
            missing = [p for p in stage_outputs(before, s, out) if not p.is_file()]
            if before not in stages and missing:
                raise ConfigError(f"--stage {stage}: {missing[0]} is missing; run --stage {before} first "
                                  "(same --output-dir and config)")


def run_stages(cfg: Config, train: ImageDataset, test: ImageDataset, out: Path, stages: list[str],
               log: Callable[[str], None] = print) -> dict[str, float]:
    """Run `stages` (in pipeline order) on `train`; returns and records seconds per stage."""
    device = torch_device(cfg.resources.num_gpus)
    out.mkdir(parents=True, exist_ok=True)
    task = make_task(cfg, train, device)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for stage in [s for s in STAGES if s in stages]:
        generator = torch.Generator().manual_seed(label_stage_seed(cfg.seed, STAGES.index(stage)))
        started = time.time()
        if stage == "experts":
            run_experts(task, out, generator, log, test)
        elif stage == "labels":
            run_labels(task, out, generator, log)
        elif stage == "flips":
            run_flips(task, out, log)
        else:
            run_user(task, out, test, generator, log)
        timings[stage] = round(time.time() - started, 2)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        log(f"{stage}: {timings[stage]:.1f}s")
    return timings


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
