"""Batched trigger inversion for the FLIP defense (Zhang et al., ICLR 2023).

Neural Cleanse / MOTH style optimisation, as described in
`shared/reference/flip-defense.md`:

* mask    `m = tanh(theta_m) / (2 - eps) + 0.5`  (shape 1 x H x W, shared over channels)
* pattern `p = tanh(theta_p) / (2 - eps) + 0.5`  (shape C x H x W)
* stamped input `x' = (1 - m) * x + m * p`       (pixels in [0, 1], no normalisation)
* loss per task `CE(f(x'), t) + cost * |m|_1`, Adam(lr=0.1, betas=(0.5, 0.9))
* adaptive cost per task: after `patience` consecutive steps at/above the success threshold
  `cost *= cost_up`; after `patience` consecutive steps below it `cost /= cost_down`
* best-so-far = smallest-L1 trigger among the successful steps; whenever it improves, the
  parameters of that task are re-initialised around it with small uniform noise (as in the
  official code; `reinit_noise = 0` disables the re-initialisation).

`|m|_1` is the sum of the single-channel H x W mask, i.e. the L1 norm of the channel-repeated
mask divided by the number of channels ("per-channel-normalised L1" of the reference and
official code: `sum(|mask.repeat(C,1,1)|) / C`).  It is *not* divided by H*W: with the
reference's `init_cost = 1e-3` the regulariser is then of order 1e-3 * (number of pixels
covered), and the size cap is `|m|_1 > max_mask_fraction * H * W`.

All K tasks are optimised together: one K x 1 x H x W mask parameter and one K x C x H x W
pattern parameter, one forward pass over the concatenated per-task minibatches and a single
Adam step.  The summed loss makes each task's gradient exactly the gradient of its own loss,
and Adam is element-wise, so batching changes nothing but speed (up to float rounding and the
random draws).

Initialisation is neutral: mask and pattern are i.i.d. uniform per pixel (default mask in
[0, 1], as in the official MNIST code), never a specific region.  The official CIFAR code's
initialisation over the true DBA-trigger rows is deliberately NOT reproduced.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "InversionSettings",
    "InversionResult",
    "invert_triggers",
    "stamp",
    "universal_tasks",
]

log = logging.getLogger(__name__)

Task = tuple[Tensor, int]


@dataclass(frozen=True)
class InversionSettings:
    """Hyperparameters of one (batched) inversion run.

    Defaults are the MNIST / Fashion-MNIST values of the reference; use
    `for_dataset` for CIFAR-10 (success threshold 0.85, size cap 1/4).
    """

    steps: int = 400
    """Optimisation steps (reference: warm-up 400 MNIST / 600 F-MNIST, CIFAR; pairs 200)."""
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    cost_up: float = 1.5
    cost_down: float = 1.5**1.5
    patience: int = 10
    success_threshold: float = 0.9
    """Fraction of a task's minibatch classified as its target for a step to count as success."""
    max_mask_fraction: float = 1.0 / 8.0
    """Triggers with `|m|_1 > max_mask_fraction * H * W` are discarded (empty trigger)."""
    epsilon: float = 1e-7
    """The `eps` of the tanh parametrisation `tanh(theta)/(2-eps)+0.5`."""
    batch_size: int = 64
    """Images per task per step; a task with at most this many images uses all of them
    every step (full batch, as the official code does for its small per-pair sets)."""
    reinit_noise: float = 0.01
    """Half-width of the uniform noise used to re-initialise a task around its new best
    trigger (official value 0.01); 0 disables re-initialisation."""
    init_mask_range: tuple[float, float] = (0.0, 1.0)
    """Neutral initialisation: mask pixels i.i.d. uniform in this range (in [0,1] space)."""
    init_pattern_range: tuple[float, float] = (0.0, 1.0)
    eval_chunk: int = 1024
    """Chunk size of the final no-grad attack-success evaluation."""

    @classmethod
    def for_dataset(cls, dataset: str, **overrides) -> InversionSettings:
        """Reference settings for `mnist`, `fashion_mnist` / `fmnist` or `cifar10`.

        `steps` is the warm-up (universal) value; pass `steps=200` (F-MNIST 400) for the
        pair inversions.
        """
        key = dataset.lower().replace("-", "_")
        if key in ("mnist",):
            base = cls(steps=400, success_threshold=0.9, max_mask_fraction=1 / 8)
        elif key in ("fashion_mnist", "fmnist", "fashionmnist"):
            base = cls(steps=600, success_threshold=0.9, max_mask_fraction=1 / 8)
        elif key in ("cifar10", "cifar", "cifar_10"):
            base = cls(steps=600, success_threshold=0.85, max_mask_fraction=1 / 4)
        else:
            raise ValueError(f"unknown dataset {dataset!r}")
        return replace(base, **overrides)


@dataclass
class InversionResult:
    """Per-task outcome of `invert_triggers` (all tensors on CPU).

    * `masks` (K x 1 x H x W), `patterns` (K x C x H x W): the best trigger of each
      successful task; all zeros where `success` is False (empty trigger).
    * `success` (K bool): some step reached the success threshold AND the best trigger is
      within the size cap.
    * `mask_l1` (K float): `|m|_1` of the best successful trigger, *also* when it was
      discarded for exceeding the cap (so callers can record sizes); `inf` if no step ever
      reached the threshold.
    * `attack_success_rate` (K float): fraction of ALL the task's images classified as the
      target when stamped with the best trigger (before the size cap is applied; for tasks
      that never succeeded, with the final iterate, to show how close they got); 0 for tasks
      without images.
    * `oversized` (K bool): a successful trigger existed but exceeded the cap.
    * `final_cost` (K float): the cost coefficient at the end of the run.
    """

    masks: Tensor
    patterns: Tensor
    success: Tensor
    mask_l1: Tensor
    attack_success_rate: Tensor
    oversized: Tensor
    final_cost: Tensor

    def __len__(self) -> int:
        return int(self.masks.shape[0])


def stamp(x: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """Pure trigger stamping `(1 - mask) * x + mask * pattern` (broadcasting, no clipping)."""
    return (1.0 - mask) * x + mask * pattern


def universal_tasks(
    images_by_class: Mapping[int, Tensor],
    num_classes: int,
    per_class: int,
    generator: torch.Generator | None = None,
) -> list[Task]:
    """One task per target `t` in `range(num_classes)`.

    Sources: up to `per_class` images of every class `!= t` present in `images_by_class`.

    Images are the first `per_class` of each class, or a random subset when a
    `generator` is given.  A target whose only available class is itself gets a task with
    zero images (it is reported as unsuccessful by `invert_triggers`).
    """
    chosen: dict[int, Tensor] = {}
    shape = None
    for c in sorted(images_by_class):
        imgs = images_by_class[c]
        if imgs is None or imgs.shape[0] == 0:
            continue
        shape = tuple(imgs.shape[1:])
        if generator is not None and imgs.shape[0] > per_class:
            idx = torch.randperm(imgs.shape[0], generator=generator)[:per_class]
            chosen[c] = imgs[idx]
        else:
            chosen[c] = imgs[:per_class]
    if shape is None:
        raise ValueError("images_by_class holds no images")
    tasks: list[Task] = []
    for t in range(num_classes):
        parts = [chosen[c] for c in sorted(chosen) if c != t]
        if parts:
            tasks.append((torch.cat(parts, 0), t))
        else:
            tasks.append((next(iter(chosen.values())).new_zeros((0,) + shape), t))
    return tasks


def _to_param(v: Tensor, eps: float) -> Tensor:
    """Inverse of `tanh(theta)/(2-eps)+0.5` for values in [0, 1] (clipped)."""
    u = (v.clamp(0.0, 1.0) - 0.5) * (2.0 - eps)
    return torch.atanh(u.clamp(-1.0 + 1e-6, 1.0 - 1e-6))


def _from_param(theta: Tensor, eps: float) -> Tensor:
    return torch.tanh(theta) / (2.0 - eps) + 0.5


def _uniform(shape, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator) * (hi - lo) + lo


# long: rewritten for issue 12 (Fast FLIP)
def invert_triggers(
    model: nn.Module,
    tasks: Sequence[Task],
    settings: InversionSettings | None = None,
    generator: torch.Generator | None = None,
    *,
    init_masks: Tensor | None = None,
    init_patterns: Tensor | None = None,
) -> InversionResult:
    """Invert one trigger per task, all tasks batched in a single optimisation.

    Args:
        model: classifier taking [N, C, H, W] images in [0, 1]. It is put in eval mode with
            `requires_grad=False` on its parameters during the run; its mode and
            `requires_grad` flags are restored afterwards. Its weights are never changed.
        tasks: sequence of `(source_images [n_i, C, H, W], target_class)`.  Symmetric or
            asymmetric pair inversion = two / one task(s); universal = see
            `universal_tasks`.
        settings: hyperparameters (default `InversionSettings`).
        generator: CPU `torch.Generator` for initialisation, minibatch draws and
            re-initialisation noise (default: seeded from the global torch RNG).
        init_masks: optional warm start of the masks in [0, 1] space (K x 1 x H x W), e.g.
            cached triggers. Rows that are all zero or contain NaN get the neutral random
            initialisation instead.
        init_patterns: the same for the patterns (K x C x H x W).

    Returns:
        `InversionResult` (CPU tensors).
    """
    s = settings or InversionSettings()
    if len(tasks) == 0:
        raise ValueError("invert_triggers needs at least one task")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    K = len(tasks)
    first = tasks[0][0]
    if first.dim() != 4:
        raise ValueError("task images must be [n, C, H, W]")
    C, H, W = (int(d) for d in first.shape[1:])
    for x, _ in tasks:
        if tuple(x.shape[1:]) != (C, H, W):
            raise ValueError("all tasks must have images of the same shape")

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    counts = torch.tensor([int(x.shape[0]) for x, _ in tasks], dtype=torch.long)
    targets = torch.tensor([int(t) for _, t in tasks], dtype=torch.long)
    active = counts > 0
    offsets = torch.cumsum(counts, 0) - counts
    xs = torch.cat([x.detach().to(device=device, dtype=torch.float32) for x, _ in tasks], 0)
    seg_all = torch.repeat_interleave(torch.arange(K), counts)
    seg_all_d = seg_all.to(device)
    tgt_all_d = targets[seg_all].to(device)
    full_batch = bool((counts <= s.batch_size).all())

    # ---- neutral initialisation (optionally warm-started) ----
    m0 = _uniform((K, 1, H, W), *s.init_mask_range, generator)
    p0 = _uniform((K, C, H, W), *s.init_pattern_range, generator)
    if init_masks is not None:
        im = init_masks.detach().to("cpu", torch.float32).reshape(K, 1, H, W)
        ok = ~torch.isnan(im).flatten(1).any(1) & (im.flatten(1).abs().sum(1) > 0)
        m0[ok] = im[ok]
        if init_patterns is not None:
            ip = init_patterns.detach().to("cpu", torch.float32).reshape(K, C, H, W)
            okp = ok & ~torch.isnan(ip).flatten(1).any(1)
            p0[okp] = ip[okp]
    theta_m = _to_param(m0, s.epsilon).to(device).requires_grad_(True)
    theta_p = _to_param(p0, s.epsilon).to(device).requires_grad_(True)
    opt = torch.optim.Adam([theta_m, theta_p], lr=s.lr, betas=s.betas)
    act_d = active.to(device=device, dtype=torch.float32)

    cost = torch.full((K,), float(s.init_cost), dtype=torch.float64)
    up_cnt = torch.zeros(K, dtype=torch.long)
    down_cnt = torch.zeros(K, dtype=torch.long)
    best_l1 = torch.full((K,), math.inf, dtype=torch.float64)
    best_m = torch.zeros(K, 1, H, W, device=device)
    best_p = torch.zeros(K, C, H, W, device=device)

    was_training = model.training
    req = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for step in range(s.steps):
                if full_batch:
                    xb, sb, tb = xs, seg_all_d, tgt_all_d
                    cnt = counts
                else:
                    parts = []
                    for k in range(K):
                        n = int(counts[k])
                        if n <= s.batch_size:
                            parts.append(torch.arange(n) + offsets[k])
                        else:
                            parts.append(
                                torch.randperm(n, generator=generator)[: s.batch_size] + offsets[k]
                            )
                    idx = torch.cat(parts)
                    cnt = counts.clamp(max=s.batch_size)
                    idx_d = idx.to(device)
                    xb, sb, tb = xs[idx_d], seg_all_d[idx_d], tgt_all_d[idx_d]

                m = _from_param(theta_m, s.epsilon)
                p = _from_param(theta_p, s.epsilon)  # type: ignore[assignment]
                mi = m[sb]
                x_adv = (1.0 - mi) * xb + mi * p[sb]
                logits = model(x_adv)
                ce = F.cross_entropy(logits, tb, reduction="none")
                cnt_d = cnt.clamp(min=1).to(device=device, dtype=ce.dtype)
                ce_k = torch.zeros(K, device=device, dtype=ce.dtype).index_add_(0, sb, ce) / cnt_d
                hit = (logits.detach().argmax(1) == tb).to(ce.dtype)
                acc_k = torch.zeros(K, device=device, dtype=ce.dtype).index_add_(0, sb, hit) / cnt_d
                l1_k = m.abs().sum(dim=(1, 2, 3))
                cost_d = cost.to(device=device, dtype=l1_k.dtype)
                loss = ((ce_k + cost_d * l1_k) * act_d).sum()

                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

                # ---- bookkeeping (CPU, float64) ----
                acc = acc_k.detach().cpu().double()
                l1 = l1_k.detach().cpu().double()
                succ = (acc >= s.success_threshold) & active
                improved = succ & (l1 < best_l1)
                if bool(improved.any()):
                    imp_d = improved.to(device)
                    best_m[imp_d] = m.detach()[imp_d]
                    best_p[imp_d] = p.detach()[imp_d]
                    best_l1[improved] = l1[improved]
                    if s.reinit_noise > 0:
                        n_imp = int(improved.sum())
                        nm = _uniform((n_imp, 1, H, W), -s.reinit_noise, s.reinit_noise, generator)
                        npt = _uniform((n_imp, C, H, W), -s.reinit_noise, s.reinit_noise, generator)
                        with torch.no_grad():
                            theta_m[imp_d] = _to_param(best_m[imp_d] + nm.to(device), s.epsilon)
                            theta_p[imp_d] = _to_param(best_p[imp_d] + npt.to(device), s.epsilon)

                up_cnt = torch.where(succ, up_cnt + 1, torch.zeros_like(up_cnt))
                down_cnt = torch.where(succ | ~active, torch.zeros_like(down_cnt), down_cnt + 1)
                go_up = up_cnt >= s.patience
                go_down = (~go_up) & (down_cnt >= s.patience)
                cost = torch.where(
                    go_up,
                    torch.where(cost == 0, torch.full_like(cost, s.init_cost), cost * s.cost_up),
                    cost,
                )
                cost = torch.where(go_down, cost / s.cost_down, cost)
                up_cnt = torch.where(go_up, torch.zeros_like(up_cnt), up_cnt)
                down_cnt = torch.where(go_down, torch.zeros_like(down_cnt), down_cnt)

                if log.isEnabledFor(logging.DEBUG) and step % 50 == 0:
                    log.debug(
                        "step %d acc %s l1 %s best %s cost %s",
                        step, acc.numpy().round(3), l1.numpy().round(1),
                        best_l1.numpy().round(1), cost.numpy(),
                    )

            # ---- final evaluation on all images of each task ----
            with torch.no_grad():
                ever = torch.isfinite(best_l1)
                ever_d = ever.to(device)
                eval_m = torch.where(
                    ever_d[:, None, None, None], best_m, _from_param(theta_m.detach(), s.epsilon)
                )
                eval_p = torch.where(
                    ever_d[:, None, None, None], best_p, _from_param(theta_p.detach(), s.epsilon)
                )
                hits = torch.zeros(K, dtype=torch.float64)
                N = xs.shape[0]
                for a in range(0, N, s.eval_chunk):
                    sl = slice(a, min(N, a + s.eval_chunk))
                    sb = seg_all_d[sl]
                    pred = model(stamp(xs[sl], eval_m[sb], eval_p[sb])).argmax(1)
                    hit = (pred == tgt_all_d[sl]).double().cpu()
                    hits.index_add_(0, seg_all[sl], hit)
                asr = hits / counts.clamp(min=1).double()
    finally:
        model.train(was_training)
        for p_, r in zip(model.parameters(), req):
            p_.requires_grad_(r)

    cap = s.max_mask_fraction * H * W
    oversized = ever & (best_l1 > cap)
    success = ever & ~oversized
    masks = best_m.detach().cpu().clone()
    patterns = best_p.detach().cpu().clone()
    masks[~success] = 0.0
    patterns[~success] = 0.0
    return InversionResult(
        masks=masks,
        patterns=patterns,
        success=success,
        mask_l1=best_l1.clone(),
        attack_success_rate=asr,
        oversized=oversized,
        final_cost=cost.clone(),
    )
