"""Step 2 of FLIP: trajectory matching on the labels.

One logit vector per training image, initialised to `init_scale * one_hot(y)`. Per minibatch of the
poisoned dataset (clean items + triggered copies, see `PoisonedData`):

* expert step: load checkpoint `theta_k` and its optimizer state, take one real
  `torch.optim.SGD` step on the poisoned batch (triggered copies labelled `target`) -> `theta_k1`;
* student step: from the same `theta_k` and optimizer state, one differentiable SGD step on the
  clean versions of the same images (a copy maps back to its clean source image and that image's
  logit), targets `softmax(logits[idx])` -> `phi`;
* loss `sum ||phi - theta_k1||^2 / sum ||theta_k - theta_k1||^2` over parameters (buffers excluded)
  `+ l1_lambda * mean_i ||softmax(logits_i) - one_hot(y_i)||_1` (over all images, as the
  official code; default 0);
* the logits take one SGD step (lr 150, momentum 0.5).

Both views share the augmentation draw. Expert and student forward passes run in train mode, so
BatchNorm uses batch statistics in both (the checkpoint's running statistics are passed to the
student but do not affect its output; the student never writes them back).

Checkpoint choice: `checkpoint_per="pass"` (default, the official code) draws one checkpoint per
outer pass and matches every minibatch of that pass from it; `"batch"` draws one per minibatch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from flip_fl.training import even_batches, soft_cross_entropy

from .augment import AugmentSettings
from .common import (
    ModelFn,
    Progress,
    Trigger,
    build_model,
    num_classes_of,
    poisoned_data,
    steps_per_epoch,
)
from .experts import Checkpoint


@dataclass(frozen=True)
class MatchSettings:
    """Label optimisation. Defaults follow the official code (15 passes; the thesis used 25)."""

    passes: int = 15
    batch_size: int = 256
    label_lr: float = 150.0
    label_momentum: float = 0.5
    init_scale: float = 5.0
    l1_lambda: float = 0.0
    n_poison_copies: int | None = None  # None: len(x) // num_classes, as for the expert
    checkpoint_per: Literal["pass", "batch"] = "pass"
    augment: AugmentSettings = field(default_factory=AugmentSettings)


@dataclass(frozen=True)
class SGDHyper:
    """Hyper-parameters of a `torch.optim.SGD` step."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    @classmethod
    def from_optimizer_state(cls, optimizer_state: dict) -> SGDHyper:
        """Hyper-parameters of the single param group of a saved `torch.optim.SGD` state."""
        groups = optimizer_state["param_groups"]
        if len(groups) != 1:
            raise ValueError(f"expected one SGD param group, got {len(groups)}")
        g = groups[0]
        if g.get("maximize", False):
            raise ValueError("maximize=True is not supported")
        return cls(lr=float(g["lr"]), momentum=float(g["momentum"]),
                   dampening=float(g["dampening"]), weight_decay=float(g["weight_decay"]),
                   nesterov=bool(g["nesterov"]))


def momentum_buffers(model: nn.Module, optimizer_state: dict) -> dict[str, Tensor | None]:
    """Map a saved SGD state to parameter names.

    `optimizer.state_dict()["state"]` is keyed by the integer ids listed in
    `param_groups[0]["params"]`; id `param_groups[0]["params"][j]` is the `j`-th parameter
    given to the optimizer, which for `SGD(model.parameters())` is the `j`-th entry of
    `model.named_parameters()`. Parameters without a buffer (never stepped) map to `None`.
    """
    names = [n for n, _ in model.named_parameters()]
    ids = optimizer_state["param_groups"][0]["params"]
    if len(ids) != len(names):
        raise ValueError(f"optimizer state has {len(ids)} params, model has {len(names)}")
    state = optimizer_state["state"]
    return {n: state.get(i, {}).get("momentum_buffer") for n, i in zip(names, ids)}


def sgd_step_functional(
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    model: nn.Module,
    x: Tensor,
    soft_targets: Tensor,
    opt_state: dict[str, Tensor | None],
    hyper: SGDHyper,
    create_graph: bool = True,
) -> dict[str, Tensor]:
    """One `torch.optim.SGD` step from `params` on `(x, soft_targets)`, differentiable.

    `model` only provides the architecture (`torch.func.functional_call`); its own tensors are not
    used or changed, and `buffers` are cloned so BatchNorm's running-stat updates do not leak out.
    Loss: `soft_cross_entropy`. `opt_state` maps parameter names to
    momentum buffers (see `momentum_buffers`). Update, as PyTorch (`maximize=False`):

        g = grad + weight_decay * p
        buf = g                                   if no buffer yet
        buf = momentum * buf + (1 - dampening) * g otherwise
        u = g + momentum * buf if nesterov else buf     (u = g when momentum == 0)
        p_new = p - lr * u

    Parameters that get no gradient are returned unchanged (PyTorch skips them). With
    `create_graph` the result stays differentiable w.r.t. `soft_targets` (and `params`).
    """
    names = list(params)
    leaves = [p if p.requires_grad else p.detach().requires_grad_() for p in params.values()]
    state = {**{n: b.clone() for n, b in buffers.items()}, **dict(zip(names, leaves))}
    loss = soft_cross_entropy(functional_call(model, state, (x,)), soft_targets)
    grads = torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True)

    new = {}
    for name, p, g in zip(names, leaves, grads):
        if g is None:
            new[name] = p
            continue
        if hyper.weight_decay != 0:
            g = g + hyper.weight_decay * p
        if hyper.momentum != 0:
            buf = opt_state.get(name)
            buf = g if buf is None else hyper.momentum * buf + (1 - hyper.dampening) * g
            g = g + hyper.momentum * buf if hyper.nesterov else buf
        new[name] = p - hyper.lr * g
    return new


class _Start:
    """A checkpoint moved to the working device, split the way the matching step needs it."""

    def __init__(self, ckpt: Checkpoint, model: nn.Module, device: torch.device):
        self.model_state = {k: v.to(device) for k, v in ckpt.model_state.items()}
        # Frozen parameters (requires_grad=False) travel with the buffers: the real optimizer
        # never updates them, so the student must not either.
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = {n: self.model_state[n] for n in trainable}
        self.buffers = {n: v for n, v in self.model_state.items() if n not in self.params}
        self.optimizer_state = ckpt.optimizer_state
        self.momentum = {n: (b.to(device) if b is not None else None)
                         for n, b in momentum_buffers(model, ckpt.optimizer_state).items()}
        self.hyper = SGDHyper.from_optimizer_state(ckpt.optimizer_state)


def _fresh_state(optimizer_state: dict) -> dict:
    """Deep copy of the tensors of an optimizer state.

    `Optimizer.load_state_dict` keeps same-device tensors by reference and `step()` updates
    momentum buffers in place, which would corrupt the checkpoint.
    """
    return {
        "state": {k: {kk: (vv.clone() if isinstance(vv, Tensor) else vv) for kk, vv in v.items()}
                  for k, v in optimizer_state["state"].items()},
        "param_groups": optimizer_state["param_groups"],
    }


def matching_loss(
    model: nn.Module,
    optimizer: torch.optim.SGD,
    start: _Start,
    x_pois: Tensor,
    y_pois: Tensor,
    x_clean: Tensor,
    soft_targets: Tensor,
) -> Tensor:
    """Normalised parameter-matching loss for one minibatch (differentiable w.r.t. soft_targets).

    `model`/`optimizer` are scratch objects: they are overwritten with the checkpoint and take
    the real expert step.
    """
    model.load_state_dict(start.model_state)
    optimizer.load_state_dict(_fresh_state(start.optimizer_state))
    model.train()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x_pois), y_pois).backward()
    optimizer.step()
    theta_k1 = {n: p.detach() for n, p in model.named_parameters()}

    phi = sgd_step_functional(start.params, start.buffers, model, x_clean, soft_targets,
                              start.momentum, start.hyper)
    num = sum(((phi[n] - theta_k1[n]) ** 2).sum() for n in phi)
    den = sum(((start.params[n] - theta_k1[n]) ** 2).sum() for n in phi)
    return cast(Tensor, num / den)


def optimize_labels(
    model_fn: ModelFn,
    trajectory: Sequence[Checkpoint],
    x: Tensor,
    y: Tensor,
    apply_trigger: Trigger,
    source: int,
    target: int,
    settings: MatchSettings,
    generator: torch.Generator,
    progress: Progress | None = None,
) -> Tensor:
    """Optimise one logit vector per image.

    Returns the `N x num_classes` logits (detached, on `x.device`). `trajectory` may concatenate several
    experts' checkpoints (all from the same architecture as `model_fn`); each draw is uniform over the list.
    `progress` gets `{"stage": "labels", "pass", "step", "total", "loss"}` after each minibatch.
    """
    if not trajectory:
        raise ValueError("empty trajectory")
    if settings.checkpoint_per not in ("pass", "batch"):
        raise ValueError(f"checkpoint_per must be 'pass' or 'batch', got {settings.checkpoint_per!r}")
    device = x.device
    model = build_model(model_fn, generator, device)
    num_classes = num_classes_of(model, x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # hyper-params come from checkpoints
    data = poisoned_data(x, y, apply_trigger, source, target, settings.n_poison_copies, num_classes, generator)

    one_hot = F.one_hot(y, num_classes).to(x.dtype)
    logits = (settings.init_scale * one_hot).requires_grad_(True)
    label_opt = torch.optim.SGD([logits], lr=settings.label_lr, momentum=settings.label_momentum)

    def draw() -> _Start:
        return _Start(trajectory[int(torch.randint(len(trajectory), (1,), generator=generator))],
                      model, device)

    total = settings.passes * steps_per_epoch(len(data), settings.batch_size)
    step = 0
    for pass_ in range(settings.passes):
        start = draw() if settings.checkpoint_per == "pass" else None
        for items in even_batches(len(data), settings.batch_size, generator):
            if settings.checkpoint_per == "batch":
                start = draw()
            x_pois, y_pois, x_clean, idx = data.batch(items, settings.augment, generator)
            assert start is not None  # drawn per pass or per batch
            loss = matching_loss(model, optimizer, start, x_pois, y_pois, x_clean,
                                 torch.softmax(logits[idx], dim=1))
            if settings.l1_lambda:
                loss = loss + settings.l1_lambda * (
                    (torch.softmax(logits, dim=1) - one_hot).abs().sum(dim=1).mean())
            (grad,) = torch.autograd.grad(loss, [logits])
            label_opt.zero_grad(set_to_none=True)
            logits.grad = grad
            label_opt.step()
            step += 1
            if progress is not None:
                progress({"stage": "labels", "pass": pass_, "step": step, "total": total,
                          "loss": float(loss.detach())})
    return logits.detach()
