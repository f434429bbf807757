"""Step 3 of FLIP: turn optimised logits into a budget of hard label flips.

`margin_i = logits[i, y_i] - max_{c != y_i} logits[i, c]`. The `budget` images with the most
negative margin are flipped, each to its highest-scoring *incorrect* class (not forced to the
target). Exactly `budget` images are flipped even if fewer have a negative margin (as the official
code). Ties in the margin are broken by the lower image index first (stable sort).

Several label runs (independent experts / matching runs) are combined per image by
`aggregate_margins`; the default `reduce="max"` is what the official code does (it keeps
`min` over runs of `-margin`): an image counts only as much as its least convincing run, the
attacker's worst case. The new label then comes from the mean of the runs' logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Budget = int | float


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """`logit(true) - max logit(other)` per row."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    return true - _mask_true(logits, y).max(dim=1).values


def _mask_true(logits: Tensor, y: Tensor) -> Tensor:
    return logits.scatter(1, y[:, None], float("-inf"))


def aggregate_margins(
    runs: Sequence[Tensor], y: Tensor, reduce: Literal["max", "min", "mean"] = "max"
) -> Tensor:
    """Per-image margin over several label runs.

    `"max"` (default, official code): the least negative margin, i.e. the worst case for the
    attacker: an image ranks high only if every run wants it flipped. `"min"`: the most negative
    margin over runs. `"mean"`: the average.
    """
    stacked = torch.stack([margins(r, y) for r in runs])
    if reduce == "max":
        return stacked.max(dim=0).values
    if reduce == "min":
        return stacked.min(dim=0).values
    if reduce == "mean":
        return stacked.mean(dim=0)
    raise ValueError(f"unknown reduce {reduce!r}")


def resolve_budget(budget: Budget, n: int) -> int:
    """An `int` count in `[0, n]`, or a `float` fraction in `(0, 1)` -> `round(budget * n)`."""
    if isinstance(budget, bool):
        raise ValueError(f"budget must be an int count or a float fraction, got {budget!r}")
    if isinstance(budget, int):
        if not 0 <= budget <= n:
            raise ValueError(f"budget {budget} outside [0, {n}]")
        return budget
    if isinstance(budget, float):
        if not 0.0 < budget < 1.0:
            raise ValueError(f"fractional budget {budget} outside (0, 1)")
        return round(budget * n)
    raise ValueError(f"budget must be an int count or a float fraction, got {budget!r}")


def _ranking(
    logits: Tensor | Sequence[Tensor], y: Tensor, reduce: str
) -> tuple[Tensor, Tensor]:
    """(image indices ordered by ascending margin, highest incorrect class per image)."""
    runs = [logits] if isinstance(logits, Tensor) else list(logits)
    m = aggregate_margins(runs, y, reduce)  # type: ignore[arg-type]
    mean = torch.stack(runs).mean(dim=0)
    order = torch.sort(m, stable=True).indices
    return order, _mask_true(mean, y).argmax(dim=1)


def select_flips(
    logits: Tensor | Sequence[Tensor],
    y: Tensor,
    budget: Budget,
    reduce: Literal["max", "min", "mean"] = "max",
) -> tuple[Tensor, Tensor]:
    """`(indices, new_labels)` of the `budget` flips.

    `logits`: `N x C` from one run, or a sequence of such tensors (several runs). `indices`
    are ordered from the most negative margin on.
    """
    order, best_wrong = _ranking(logits, y, reduce)
    k = resolve_budget(budget, len(y))
    idx = order[:k]
    return idx, best_wrong[idx]


def apply_flips(y: Tensor, indices: Tensor, new_labels: Tensor) -> Tensor:
    """A copy of `y` with `new_labels` at `indices`."""
    out = y.clone()
    out[indices] = new_labels.to(y.dtype)
    return out


def flip_labels_at_budgets(
    logits: Tensor | Sequence[Tensor],
    y: Tensor,
    budgets: Sequence[Budget],
    reduce: Literal["max", "min", "mean"] = "max",
) -> dict[Budget, Tensor]:
    """`{budget: flipped hard labels (N,)}`; a larger budget's flips contain a smaller one's."""
    order, best_wrong = _ranking(logits, y, reduce)
    out = {}
    for b in budgets:
        idx = order[: resolve_budget(b, len(y))]
        out[b] = apply_flips(y, idx, best_wrong[idx])
    return out


def random_flips(
    y: Tensor, budget: Budget, target: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Baseline: `budget` random non-target images relabelled `target` -> `(indices, labels)`."""
    candidates = torch.nonzero(y.cpu() != target).flatten()
    k = resolve_budget(budget, len(y))
    if k > len(candidates):
        raise ValueError(f"budget {k} exceeds the {len(candidates)} non-target images")
    idx = candidates[torch.randperm(len(candidates), generator=generator)[:k]].to(y.device)
    return idx, torch.full_like(idx, target)


def matched_random_flips(
    y: Tensor, indices: Tensor, new_labels: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Baseline with the class make-up of given flips.

    For every class, as many random images of that class as `indices` holds, given the labels
    `new_labels` gave that class.

    It separates what trajectory matching adds by *which* images it picks from what any flips of
    those classes to those labels do -> `(indices, labels)`.
    """
    y_cpu, picked, new = y.cpu(), indices.cpu(), new_labels.cpu()
    chosen, relabel = [picked[:0]], [new[:0]]
    for c in torch.unique(y_cpu[picked]).tolist():
        of_class = y_cpu[picked] == c
        members = torch.nonzero(y_cpu == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[: int(of_class.sum())]])
        relabel.append(new[of_class])
    return torch.cat(chosen).to(y.device), torch.cat(relabel).to(y.device)
