"""Batched trigger inversion for the FLIP defense (Zhang et al., ICLR 2023).

Neural Cleanse / MOTH style optimisation (`shared/reference/flip-defense.md`):

* mask    `m = tanh(theta_m) / (2 - eps) + 0.5`  (1 x H x W, shared over channels)
* pattern `p = tanh(theta_p) / (2 - eps) + 0.5`  (C x H x W)
* stamped input `x' = (1 - m) * x + m * p`       (pixels in [0, 1], no normalisation)
* loss per task `CE(f(x'), t) + cost * |m|_1`, Adam(lr=0.1, betas=(0.5, 0.9)); the cross-entropy is
  the mean over the task's images, or their sum (`InversionSettings.sum_ce`, as the official
  symmetric pair inversion does: with Adam that acts like dividing the cost by the image count)
* adaptive cost per task: after `patience` consecutive steps at/above the success threshold
  `cost *= cost_up`; after `patience` consecutive steps below it `cost /= cost_down`
* best-so-far = smallest-L1 trigger among the successful steps; whenever it improves, that task
  restarts around it with uniform noise of half-width `reinit_noise` (official code; 0 disables)
* optional early stop (`stop_patience`): the call ends once no task's best trigger has shrunk
  by more than `stop_tolerance` (relative) for that many steps.

`|m|_1` is the sum of the single-channel H x W mask (the official `sum(|mask.repeat(C)|) / C`);
the size cap discards triggers with `|m|_1 > max_mask_fraction * H * W`.

All K tasks are optimised together: one K x 1 x H x W mask and one K x C x H x W pattern
parameter, one forward pass over the concatenated per-task images and one Adam step. The summed
loss gives each task exactly the gradient of its own loss and Adam is element-wise, so batching
changes nothing but speed (up to float rounding and the random draws). The per-step bookkeeping
stays on the model's device (no host synchronisation except for the early-stop check).

Initialisation is neutral: mask and pattern i.i.d. uniform per pixel, never a specific region (the
official CIFAR code's initialisation over the true DBA rows is deliberately not reproduced).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InversionSettings", "InversionResult", "invert_triggers", "stamp", "universal_tasks"]

Task = tuple[Tensor, int]


@dataclass(frozen=True)
class InversionSettings:
    """Hyperparameters of one (batched) inversion call; defaults are the MNIST reference values."""

    steps: int = 400
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    cost_up: float = 1.5
    cost_down: float = 1.5**1.5
    patience: int = 10
    success_threshold: float = 0.9
    """Fraction of a task's images classified as its target for a step to count as a success."""
    max_mask_fraction: float = 1.0 / 8.0
    """Triggers with `|m|_1 > max_mask_fraction * H * W` are discarded (empty trigger)."""
    epsilon: float = 1e-7
    batch_size: int = 64
    """Images per task per step; a task with at most this many images uses all of them every step."""
    reinit_noise: float = 0.01
    init_mask_range: tuple[float, float] = (0.0, 1.0)
    init_pattern_range: tuple[float, float] = (0.0, 1.0)
    sum_ce: bool = False
    """Sum the cross-entropy over a task's images instead of averaging it (official symmetric pairs)."""
    stop_patience: int = 0
    """Every this many steps, end the call if no best trigger shrank by `stop_tolerance` since (0: never)."""
    stop_tolerance: float = 0.01
    eval_chunk: int = 1024

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: object) -> InversionSettings:
        """Reference warm-up settings for `mnist`, `fashion_mnist` or `cifar10`."""
        key = dataset.lower().replace("-", "_")
        bases = {"mnist": cls(steps=400, success_threshold=0.9, max_mask_fraction=1 / 8),
                 "fashion_mnist": cls(steps=600, success_threshold=0.9, max_mask_fraction=1 / 8),
                 "cifar10": cls(steps=600, success_threshold=0.85, max_mask_fraction=1 / 4)}
        if key not in bases:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(bases)}")
        return replace(bases[key], **overrides)  # type: ignore[arg-type]


@dataclass
class InversionResult:
    """Per-task outcome of `invert_triggers` (CPU tensors).

    `masks` (K x 1 x H x W) and `patterns` (K x C x H x W) hold the best trigger of each
    successful task and zeros elsewhere; `success` (K) is true when some step reached the success
    threshold and the best trigger is within the size cap; `mask_l1` (K) is the best trigger's size,
    also when it exceeds the cap (`inf` if never successful); `attack_success_rate` (K) is the
    fraction of all the task's images sent to the target by the best trigger (the last iterate for
    tasks that never succeeded); `oversized` (K) marks successful triggers over the cap;
    `final_cost` (K) is the cost coefficient at the end; `steps` is how many steps ran;
    `best_masks` / `best_patterns` hold every task's best trigger, oversized ones included (the last
    iterate where none succeeded): the place to continue from in a later call.
    """

    masks: Tensor
    patterns: Tensor
    success: Tensor
    mask_l1: Tensor
    attack_success_rate: Tensor
    oversized: Tensor
    final_cost: Tensor
    best_masks: Tensor
    best_patterns: Tensor
    steps: int = 0

    def __len__(self) -> int:
        return int(self.masks.shape[0])


def stamp(x: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """Pure trigger stamping `(1 - mask) * x + mask * pattern` (broadcasting, no clipping)."""
    return (1.0 - mask) * x + mask * pattern


def universal_tasks(images_by_class: Mapping[int, Tensor], num_classes: int, per_class: int,
                    generator: torch.Generator | None = None) -> list[Task]:
    """One task per target `t`: sources are up to `per_class` images of every class `!= t`.

    Images are the first `per_class` of each class, or a random subset with a `generator`.
    A target whose only available class is itself gets a task with zero images (unsuccessful).
    """
    chosen: dict[int, Tensor] = {}
    for c in sorted(images_by_class):
        imgs = images_by_class[c]
        if imgs is None or imgs.shape[0] == 0:
            continue
        if generator is not None and imgs.shape[0] > per_class:
            imgs = imgs[torch.randperm(imgs.shape[0], generator=generator)[:per_class]]
        chosen[c] = imgs[:per_class]
    if not chosen:
        raise ValueError("images_by_class holds no images")
    empty = next(iter(chosen.values()))[:0]
    tasks: list[Task] = []
    for t in range(num_classes):
        parts = [chosen[c] for c in sorted(chosen) if c != t]
        tasks.append((torch.cat(parts, 0) if parts else empty, t))
    return tasks


def _to_param(v: Tensor, eps: float) -> Tensor:
    """Inverse of `tanh(theta)/(2-eps)+0.5` for values in [0, 1] (clipped)."""
    u = (v.clamp(0.0, 1.0) - 0.5) * (2.0 - eps)
    return torch.atanh(u.clamp(-1.0 + 1e-6, 1.0 - 1e-6))


def _from_param(theta: Tensor, eps: float) -> Tensor:
    return torch.tanh(theta) / (2.0 - eps) + 0.5


def _uniform(shape: tuple[int, ...], lo: float, hi: float, generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator) * (hi - lo) + lo


@dataclass
class _Packed:
    """The tasks' images concatenated, with each image's task index and target, on the device."""

    images: Tensor
    segment: Tensor
    target: Tensor
    counts: Tensor  # per task, CPU
    offsets: Tensor  # per task, CPU

    @classmethod
    def of(cls, tasks: Sequence[Task], device: torch.device) -> _Packed:
        counts = torch.tensor([int(x.shape[0]) for x, _ in tasks], dtype=torch.long)
        targets = torch.tensor([int(t) for _, t in tasks], dtype=torch.long)
        segment = torch.repeat_interleave(torch.arange(len(tasks)), counts)
        images = torch.cat([x.detach().to(device=device, dtype=torch.float32) for x, _ in tasks], 0)
        return cls(images, segment.to(device), targets[segment].to(device), counts, torch.cumsum(counts, 0) - counts)

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Images, task index, target and per-task count of one step (all of a task's images if few)."""
        if bool((self.counts <= batch_size).all()):
            return self.images, self.segment, self.target, self.counts
        parts = [torch.randperm(int(n), generator=generator)[:batch_size] + int(o) if n > batch_size
                 else torch.arange(int(n)) + int(o) for n, o in zip(self.counts, self.offsets)]
        idx = torch.cat(parts).to(self.images.device)
        return self.images[idx], self.segment[idx], self.target[idx], self.counts.clamp(max=batch_size)


def _initial_triggers(shape: tuple[int, int, int, int], s: InversionSettings, generator: torch.Generator,
                      init_masks: Tensor | None, init_patterns: Tensor | None) -> tuple[Tensor, Tensor]:
    """Neutral random masks and patterns, replaced by the warm starts whose mask rows are usable."""
    k, c, h, w = shape
    m0 = _uniform((k, 1, h, w), *s.init_mask_range, generator)
    p0 = _uniform((k, c, h, w), *s.init_pattern_range, generator)
    if init_masks is None:
        return m0, p0
    im = init_masks.detach().to("cpu", torch.float32).reshape(k, 1, h, w)
    ok = ~torch.isnan(im).flatten(1).any(1) & (im.flatten(1).abs().sum(1) > 0)
    m0[ok] = im[ok]
    if init_patterns is not None:
        ip = init_patterns.detach().to("cpu", torch.float32).reshape(k, c, h, w)
        okp = ok & ~torch.isnan(ip).flatten(1).any(1)
        p0[okp] = ip[okp]
    return m0, p0


class TriggerSearch:
    """The optimisation state of one batched inversion call (all tensors on the model's device)."""

    def __init__(self, shape: tuple[int, int, int, int], s: InversionSettings, device: torch.device,
                 init: tuple[Tensor, Tensor], active: Tensor, noise_seed: int, init_costs: Tensor | None) -> None:
        k = shape[0]
        self.s = s
        self.noise = torch.Generator(device=device).manual_seed(noise_seed)
        self.theta_m = _to_param(init[0], s.epsilon).to(device).requires_grad_(True)
        self.theta_p = _to_param(init[1], s.epsilon).to(device).requires_grad_(True)
        self.opt = torch.optim.Adam([self.theta_m, self.theta_p], lr=s.lr, betas=s.betas)
        self.active = active.to(device)
        self.cost = (torch.full((k,), float(s.init_cost), dtype=torch.float64) if init_costs is None
                     else init_costs.detach().to("cpu", torch.float64).reshape(k).clone()).to(device)
        self.up = torch.zeros(k, dtype=torch.long, device=device)
        self.down = torch.zeros(k, dtype=torch.long, device=device)
        self.best_l1 = torch.full((k,), math.inf, dtype=torch.float64, device=device)
        self.best_m = torch.zeros(k, 1, *shape[2:], device=device)
        self.best_p = torch.zeros(shape, device=device)
        self.mark = self.best_l1.clone()
        self.good_l1 = torch.full((k,), math.inf, dtype=torch.float64, device=device)
        self.good_m = torch.zeros(k, 1, *shape[2:], device=device)
        self.good_p = torch.zeros(shape, device=device)

    def step(self, model: nn.Module, x: Tensor, seg: Tensor, tgt: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """One Adam step on every task; returns (success fraction, mask L1) per task of the pre-step trigger."""
        k = self.cost.shape[0]
        m = _from_param(self.theta_m, self.s.epsilon)
        p = _from_param(self.theta_p, self.s.epsilon)
        logits = model(stamp(x, m[seg], p[seg]))
        ce = F.cross_entropy(logits, tgt, reduction="none")
        n = counts.clamp(min=1).to(device=ce.device, dtype=ce.dtype)
        ce_k = torch.zeros(k, device=ce.device, dtype=ce.dtype).index_add_(0, seg, ce)
        if not self.s.sum_ce:
            ce_k = ce_k / n
        hits = (logits.detach().argmax(1) == tgt).to(ce.dtype)
        acc = torch.zeros(k, device=ce.device, dtype=ce.dtype).index_add_(0, seg, hits) / n
        l1 = m.abs().sum(dim=(1, 2, 3))
        loss = ((ce_k + self.cost.to(l1.dtype) * l1) * self.active.to(l1.dtype)).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.record(m.detach(), p.detach(), acc.detach().double(), l1.detach().double())
        return acc, l1

    def record(self, m: Tensor, p: Tensor, acc: Tensor, l1: Tensor) -> None:
        """Keep the best successful triggers (restarting around them) and adapt the costs."""
        s = self.s
        succ = (acc >= s.success_threshold) & self.active
        improved = succ & (l1 < self.best_l1)
        ok_rows = succ[:, None, None, None]
        self.good_m = torch.where(ok_rows, m, self.good_m)
        self.good_p = torch.where(ok_rows, p, self.good_p)
        self.good_l1 = torch.where(succ, l1, self.good_l1)
        rows = improved[:, None, None, None]
        self.best_m = torch.where(rows, m, self.best_m)
        self.best_p = torch.where(rows, p, self.best_p)
        self.best_l1 = torch.where(improved, l1, self.best_l1)
        if s.reinit_noise > 0:
            self._restart(rows)
        self.up = torch.where(succ, self.up + 1, torch.zeros_like(self.up))
        self.down = torch.where(succ | ~self.active, torch.zeros_like(self.down), self.down + 1)
        go_up = self.up >= s.patience
        go_down = ~go_up & (self.down >= s.patience)
        raised = torch.where(self.cost == 0, torch.full_like(self.cost, s.init_cost), self.cost * s.cost_up)
        self.cost = torch.where(go_up, raised, torch.where(go_down, self.cost / s.cost_down, self.cost))
        self.up = torch.where(go_up, torch.zeros_like(self.up), self.up)
        self.down = torch.where(go_down, torch.zeros_like(self.down), self.down)

    def _restart(self, rows: Tensor) -> None:
        """Tasks whose best improved continue from it plus uniform noise (official MOTH behaviour).

        Noise is drawn for every task at every step (on the device, from the call's own generator), so
        that no host synchronisation is needed to find the improved ones.
        """
        s = self.s
        noise_m = (torch.rand(self.best_m.shape, generator=self.noise, device=self.best_m.device) * 2 - 1)
        noise_p = (torch.rand(self.best_p.shape, generator=self.noise, device=self.best_p.device) * 2 - 1)
        noise_m, noise_p = noise_m * s.reinit_noise, noise_p * s.reinit_noise
        with torch.no_grad():
            self.theta_m.copy_(torch.where(rows, _to_param(self.best_m + noise_m, s.epsilon), self.theta_m))
            self.theta_p.copy_(torch.where(rows, _to_param(self.best_p + noise_p, s.epsilon), self.theta_p))

    def stalled(self, step: int) -> bool:
        """Whether the early-stop rule ends the call after `step`.

        Checked every `stop_patience` steps, it holds when every task has succeeded and none shrank its best
        trigger by `stop_tolerance` since the last check.
        """
        if self.s.stop_patience <= 0 or step % self.s.stop_patience:
            return False
        shrunk = self.best_l1 < self.mark * (1.0 - self.s.stop_tolerance)
        searching = self.active & ~torch.isfinite(self.best_l1)  # never successful yet: keep going
        self.mark = self.best_l1.clone()
        return not bool((shrunk | searching).any())

    def final(self) -> tuple[Tensor, Tensor, Tensor]:
        """Best triggers where one was found, the last iterate elsewhere, and whether one was found."""
        ever = torch.isfinite(self.best_l1)
        rows = ever[:, None, None, None]
        with torch.no_grad():
            m = torch.where(rows, self.best_m, _from_param(self.theta_m, self.s.epsilon))
            p = torch.where(rows, self.best_p, _from_param(self.theta_p, self.s.epsilon))
        return m, p, ever


@torch.no_grad()
def _success_rates(model: nn.Module, packed: _Packed, masks: Tensor, patterns: Tensor, chunk: int) -> Tensor:
    """Fraction of each task's images classified as its target when stamped with its trigger."""
    k = masks.shape[0]
    hits = torch.zeros(k, dtype=torch.float64, device=masks.device)
    for a in range(0, packed.images.shape[0], chunk):
        seg = packed.segment[a:a + chunk]
        pred = model(stamp(packed.images[a:a + chunk], masks[seg], patterns[seg])).argmax(1)
        hits.index_add_(0, seg, (pred == packed.target[a:a + chunk]).double())
    return hits.cpu() / packed.counts.clamp(min=1).double()


def _check_tasks(tasks: Sequence[Task]) -> tuple[int, int, int]:
    if len(tasks) == 0:
        raise ValueError("invert_triggers needs at least one task")
    first = tasks[0][0]
    if first.dim() != 4:
        raise ValueError("task images must be [n, C, H, W]")
    c, h, w = (int(d) for d in first.shape[1:])
    if any(tuple(x.shape[1:]) != (c, h, w) for x, _ in tasks):
        raise ValueError("all tasks must have images of the same shape")
    return c, h, w


def invert_triggers(model: nn.Module, tasks: Sequence[Task], settings: InversionSettings | None = None,
                    generator: torch.Generator | None = None, *, init_masks: Tensor | None = None,
                    init_patterns: Tensor | None = None, init_costs: Tensor | None = None) -> InversionResult:
    """Invert one trigger per task `(source_images [n, C, H, W], target)`, all tasks in one optimisation.

    The model runs in eval mode with frozen parameters; its mode and `requires_grad` flags are
    restored and its weights never change. `generator` (CPU) draws the initialisation and the
    minibatches; `init_masks` / `init_patterns` (K x 1 x H x W / K x C x H x W in [0, 1]) warm-start
    the tasks whose mask rows are non-zero and finite; `init_costs` (K) replaces `settings.init_cost`
    per task (e.g. the cost a cached trigger's last inversion ended with).
    """
    s = settings or InversionSettings()
    c, h, w = _check_tasks(tasks)
    generator = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    device = next(model.parameters(), torch.empty(0)).device
    packed = _Packed.of(tasks, device)
    shape = (len(tasks), c, h, w)
    init = _initial_triggers(shape, s, generator, init_masks, init_patterns)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    search = TriggerSearch(shape, s, device, init, packed.counts > 0, noise_seed, init_costs)
    was_training, flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    steps = 0
    try:
        with torch.enable_grad():
            for steps in range(1, s.steps + 1):
                search.step(model, *packed.draw(s.batch_size, generator))
                if search.stalled(steps):
                    break
        masks, patterns, ever = search.final()
        asr = _success_rates(model, packed, masks, patterns, s.eval_chunk)
    finally:
        model.train(was_training)
        for p_, flag in zip(model.parameters(), flags):
            p_.requires_grad_(flag)
    return _result(search, masks, patterns, ever, asr, s.max_mask_fraction * h * w, steps)


def _result(search: TriggerSearch, masks: Tensor, patterns: Tensor, ever: Tensor, asr: Tensor, cap: float,
            steps: int) -> InversionResult:
    best_l1 = search.best_l1.cpu()
    ever = ever.cpu()
    oversized = ever & (best_l1 > cap)
    success = ever & ~oversized
    keep = success[:, None, None, None]
    masks, patterns = masks.cpu(), patterns.cpu()
    return InversionResult(masks=torch.where(keep, masks, 0.0), patterns=torch.where(keep, patterns, 0.0),
                           success=success, mask_l1=best_l1, attack_success_rate=asr, oversized=oversized,
                           final_cost=search.cost.cpu(), best_masks=masks, best_patterns=patterns, steps=steps)
