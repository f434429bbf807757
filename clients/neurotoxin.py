"""Neurotoxin (Zhang et al., ICML 2022, "Neurotoxin: Durable Backdoors in Federated Learning").

The attacker poisons its batches as `PoisonClient` does, but after every backward pass it zeroes its gradient
on the top-k% coordinates (by magnitude, over all trained parameters at once) of the benign direction, so the
backdoor lives in coordinates the benign clients rarely change and survives longer once the attack stops; its
model is then kept inside the L2 ball of `attack.norm_bound` as `NormBoundedClient` does (PGD).

The benign direction is the paper's: the last global update as the attacker sees it, the difference between
the global model it receives now and the one it received the last time it was selected (kept in the client
state, float32, trained parameters only, so it survives checkpoints and `--resume`). With no usable previous
global model (its first selection, one that does not fit, or a global model that did not move) it uses what the
authors' code always uses, the gradient of the received global model on clean data (here: its own local data,
unpoisoned). Every deviation is listed in docs/ATTACKS.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from clients.poison import NormBoundedClient
from flip_fl.config import Config, ConfigError
from flip_fl.federation.client import FitResult, RoundInfo, StateDict
from flip_fl.training import AfterStep, batch_indices, classification_loss

PREVIOUS = "neurotoxin.previous_global."
"""Prefix of the client-state arrays holding the previous global model's trained parameters."""


def num_masked(size: int, percent: float) -> int:
    """How many of `size` coordinates the top `percent`% are: `percent / 100 * size` rounded, halves up."""
    if not 0.0 < percent < 100.0:
        raise ValueError(f"percent must be in (0, 100), got {percent}")
    # the 1e-9 absorbs float error such as 0.07 * 100 = 7.000000000000001 vs 6.999999999999999
    return min(int(math.floor(percent / 100.0 * size + 0.5 + 1e-9)), size)


def neurotoxin_mask(direction: Mapping[str, Tensor], percent: float) -> dict[str, Tensor]:
    """Where the attacker may move: False on the top-`percent`% coordinates of |direction|, True elsewhere.

    One ranking over all entries jointly (the authors' `aggregate_all_layer=1`, used by all their commands);
    ties at the cut are broken by position (the earlier coordinate is masked), the same on every run.
    """
    names = list(direction)
    flat = torch.cat([direction[k].detach().reshape(-1).double().cpu() for k in names]) if names else torch.zeros(0)
    allowed = torch.ones(flat.numel(), dtype=torch.bool)
    k = num_masked(flat.numel(), percent)
    if k > 0:
        order = torch.from_numpy(np.argsort(-flat.abs().numpy(), kind="stable"))
        allowed[order[:k]] = False
    out, start = {}, 0
    for name in names:
        n = direction[name].numel()
        out[name] = allowed[start:start + n].reshape(direction[name].shape)
        start += n
    return out


def trained_names(model: nn.Module) -> list[str]:
    """The names of the trained parameters (BatchNorm running statistics and other buffers excluded)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


class NeurotoxinClient(NormBoundedClient):
    """Neurotoxin: PGD poisoning whose gradient is zeroed on the top-k% coordinates of the benign direction.

    `attack.neurotoxin_topk` is k (a percentage; the authors' commands: 5), `attack.norm_bound` the L2 radius
    (required, as for `NormBoundedClient`). Every selection stores the received global model in the client
    state; attack rounds report `neurotoxin_estimate` (1: the global models' difference, 0: the clean-data
    gradient, on a first selection) and `neurotoxin_masked` (the fraction of trained coordinates masked).
    """

    mask: dict[str, Tensor]
    """This attack round's mask (True: the attacker may move the coordinate), set by `fit` before training."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """The norm bound is required (Neurotoxin is norm-bounded like PGD)."""
        if cfg.attack.norm_bound is None:
            raise ConfigError("attack.norm_bound: required by clients.NeurotoxinClient (the L2 radius eps of its "
                              "PGD projection)")
        super().check_config(cfg)

    def fit(self, global_state: StateDict, info: RoundInfo) -> FitResult:
        """Remember the global model; in attack rounds, train with the mask (set up in `step_hook`)."""
        model = self.model_from(global_state)
        names = trained_names(model)
        previous = self.previous_global(global_state, names)
        self.remember_global(global_state, names)
        if not info.attacking:
            return super().fit(global_state, info)
        direction = {k: global_state[k].float() - previous[k] for k in names} if previous is not None else {}
        from_globals = any(bool(d.any()) for d in direction.values())  # a global that did not move shows no direction
        if not from_globals:
            direction = self.clean_gradient(model, names)
        self.mask = neurotoxin_mask(direction, self.cfg.attack.neurotoxin_topk)
        result = super().fit(global_state, info)
        masked = sum(int((~m).sum()) for m in self.mask.values()) / max(sum(m.numel() for m in self.mask.values()), 1)
        result.metrics.update({"neurotoxin_estimate": float(from_globals), "neurotoxin_masked": masked})
        return result

    def step_hook(self, global_state: StateDict, model: torch.nn.Module) -> AfterStep | None:
        """Zero the gradient on the masked coordinates after every backward pass; project as PGD does.

        `PoisonClient.fit` calls this once with the fresh model, before training: the hooks registered here
        multiply each parameter's gradient by its mask before it reaches `.grad` (the authors'
        `apply_grad_mask` between `backward()` and `step()`).
        """
        params = dict(model.named_parameters())
        for name, allowed in self.mask.items():
            keep = allowed.to(device=params[name].device, dtype=params[name].dtype)
            params[name].register_hook(lambda grad, keep=keep: grad * keep)
        return super().step_hook(global_state, model)

    def previous_global(self, global_state: StateDict, names: list[str]) -> dict[str, Tensor] | None:
        """The trained parameters of the global model of this partition's last selection (None on the first).

        A stored model that does not fit this one (other names or shapes, non-finite values) counts as none.
        """
        stored = {k[len(PREVIOUS):]: v for k, v in self.state.arrays.items() if k.startswith(PREVIOUS)}
        if set(stored) != set(names):
            return None
        out = {k: torch.from_numpy(np.asarray(stored[k], dtype=np.float32)) for k in names}
        if any(out[k].shape != global_state[k].shape or not torch.isfinite(out[k]).all() for k in names):
            return None
        return out

    def remember_global(self, global_state: StateDict, names: list[str]) -> None:
        """Store the received global model's trained parameters (float32) in the client state."""
        for k in [k for k in self.state.arrays if k.startswith(PREVIOUS)]:
            del self.state.arrays[k]
        self.state.arrays.update({PREVIOUS + k: global_state[k].detach().cpu().float().numpy().copy() for k in names})

    def clean_gradient(self, model: nn.Module, names: list[str]) -> dict[str, Tensor]:
        """The gradient of the global model (`model`, a throwaway copy) on the local data, unpoisoned.

        Summed over minibatches of `training.batch_size` in order, as the authors' `grad_mask_cv` accumulates it.
        """
        model.train()
        model.zero_grad(set_to_none=True)
        for idx in batch_indices(len(self.data), self.cfg.training.batch_size, torch.Generator(), shuffle=False):
            x, y = self.data.batch(idx)
            classification_loss(model(x.to(self.device)), y.to(self.device)).backward()
        params = dict(model.named_parameters())
        out = {}
        for k in names:
            grad = params[k].grad
            out[k] = torch.zeros(params[k].shape) if grad is None else grad.detach().cpu()  # unused: no direction
        return out
