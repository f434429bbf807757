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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flip_fl.attacks.flip_labels import (
    LabelScores,
    apply_flips,
    evaluate_cta_pta,
    matched_random_flips,
    random_flips,
    select_flips,
    soft_labels,
    train_user_model,
)
from flip_fl.attacks.flip_labels.stages import (
    DONE,
    LabelTask,
    all_on,
    budget_name,
    describe_scores,
    load_logits,
    make_task,
    run_experts,
    run_labels,
    user_settings,
)
from flip_fl.config import Config, ConfigError, FlipLabelsConfig
from flip_fl.data import ImageDataset
from flip_fl.device import torch_device
from flip_fl.seeds import label_stage_seed
from flip_fl.tables import markdown_table, write_csv

STAGES = ("experts", "labels", "flips", "user")


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
    log(f"user: clean labels: {describe_scores(scores)}")
    for budget, kind, targets, indices in _label_sets(task, out, y):
        n_flips = len(indices)
        scores = _train_and_score(task, targets, x_test, y_test, generator)
        rows.append(_row(budget, n_flips, kind, scores))
        log(f"user: {kind} labels, budget {budget} ({n_flips} flips): {describe_scores(scores)}")
        new_labels = targets[indices] if targets.dim() == 1 else targets[indices].argmax(dim=1)
        for name, what, (idx, new) in _baselines(task, y, indices, new_labels, generator):
            scores = _train_and_score(task, apply_flips(y, idx, new), x_test, y_test, generator)
            rows.append(_row(budget, n_flips, name, scores))
            log(f"user: budget {budget}, {n_flips} {what}: {describe_scores(scores)}")
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
