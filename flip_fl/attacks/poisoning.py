"""Pure attack math: batch poisoning, model-replacement scaling, L2 projection of updates.

State dicts are `{name: Tensor}` (e.g. `model.state_dict()`). "Floating entries" are the
floating-point tensors (weights, biases, BatchNorm running mean/var); integer buffers such as
BatchNorm `num_batches_tracked` are never scaled or counted in norms: they are copied from the
local state unchanged. Every function returns new tensors and leaves its inputs untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from flip_fl.attacks.triggers import Trigger

__all__ = [
    "poison_batch",
    "num_poison_for_batch",
    "model_replacement_scale",
    "scale_update",
    "update_norm",
    "project_l2",
]


def poison_batch(
    x: Tensor,
    y: Tensor,
    trigger: Trigger,
    target_label: int,
    num_poison: int,
    piece: int | None = None,
    source_label: int = -1,
) -> tuple[Tensor, Tensor]:
    """Stamp the first `num_poison` samples of the batch with `trigger` and relabel them.

    The trigger is local `piece` or, with `piece=None`, the full trigger; the label is `target_label`, as the
    DBA and FLIP defense code do. With `source_label >= 0` only samples of that class are eligible (the first
    `num_poison` of them). `num_poison` is clipped to what is eligible. Returns copies `(x2, y2)`.
    """
    if num_poison < 0:
        raise ValueError(f"num_poison must be >= 0, got {num_poison}")
    eligible = torch.arange(len(y)) if source_label < 0 else (y == source_label).nonzero().flatten()
    chosen = eligible[: int(num_poison)]
    x2, y2 = x.clone(), y.clone()
    if len(chosen) > 0:
        x2[chosen] = trigger.apply(x[chosen], piece)
        y2[chosen] = target_label
    return x2, y2


def num_poison_for_batch(
    batch_size: int, fraction: float | None = None, count: int | None = None
) -> int:
    """How many samples of a batch of `batch_size` to poison.

    Give exactly one of:

    - `count`: a fixed number per batch (the DBA/FLIP setting, e.g. 20 of 64), capped at
      `batch_size` (so a short last batch is poisoned entirely if it is smaller than `count`);
    - `fraction` in [0, 1]: `round(fraction * batch_size)` with halves rounded up, e.g.
      fraction 20/64 gives 20 for a batch of 64 and 5 for a batch of 16.
    """
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction or count")
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if count is not None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        return min(int(count), int(batch_size))
    assert fraction is not None  # exactly one of the two is given
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    # the 1e-9 absorbs float error such as 0.1 * 25 = 2.5000000000000004 vs 2.4999999999999996
    return min(int(math.floor(fraction * batch_size + 0.5 + 1e-9)), int(batch_size))


def model_replacement_scale(
    num_clients_per_round: int,
    server_lr: float,
    weighted: bool = False,
    total_examples: int | None = None,
    attacker_examples: int | None = None,
) -> float:
    """Scale factor gamma of the model-replacement attack (Bagdasaryan et al. 2020).

    The attacker submits `global + gamma * (local - global)` (see `scale_update`). If the other
    clients' updates are ~0 (the global model has converged), the server's aggregation then yields
    the attacker's local model:

    - unweighted (FLIP defense server): `global += eta * mean_i(delta_i)` over
      `num_clients_per_round` clients -> `gamma = num_clients_per_round / eta`
      (10 clients, eta 0.1 -> 100, the paper's x100);
    - weighted (FedAvg-style): `global += eta * sum_i(n_i / N * delta_i)` -> `gamma = N / (eta * n_att)`
      with `N = total_examples` (all sampled clients of the round, attacker included) and
      `n_att = attacker_examples`; `num_clients_per_round` is then not used.
    """
    if server_lr <= 0:
        raise ValueError(f"server_lr must be > 0, got {server_lr}")
    if not weighted:
        if num_clients_per_round <= 0:
            raise ValueError(f"num_clients_per_round must be > 0, got {num_clients_per_round}")
        return num_clients_per_round / server_lr
    if total_examples is None or attacker_examples is None:
        raise ValueError("weighted scaling needs total_examples and attacker_examples")
    if attacker_examples <= 0 or total_examples < attacker_examples:
        raise ValueError(
            f"need 0 < attacker_examples <= total_examples, got {attacker_examples}, {total_examples}"
        )
    return total_examples / (server_lr * attacker_examples)


def _check_keys(global_state: Mapping[str, Tensor], local_state: Mapping[str, Tensor]) -> None:
    if global_state.keys() != local_state.keys():
        diff = sorted(set(global_state) ^ set(local_state))
        raise ValueError(f"state dicts have different keys: {diff}")


def scale_update(
    global_state: Mapping[str, Tensor], local_state: Mapping[str, Tensor], gamma: float
) -> dict[str, Tensor]:
    """`global + gamma * (local - global)` for floating entries.

    Results are in the local entry's dtype and device; non-floating entries (e.g.
    `num_batches_tracked`) are copied from `local`.
    """
    _check_keys(global_state, local_state)
    out: dict[str, Tensor] = {}
    for k, loc in local_state.items():
        loc = loc.detach()
        if loc.is_floating_point():
            glob = global_state[k].detach().to(device=loc.device, dtype=loc.dtype)
            out[k] = glob + gamma * (loc - glob)
        else:
            out[k] = loc.clone()
    return out


def update_norm(global_state: Mapping[str, Tensor], local_state: Mapping[str, Tensor]) -> float:
    """L2 norm of `local - global` over all floating entries jointly (float64 accumulation)."""
    _check_keys(global_state, local_state)
    squares = [
        (loc.detach().double() - global_state[k].detach().to(loc.device).double()).pow(2).sum()
        for k, loc in local_state.items()
        if loc.is_floating_point()
    ]
    if not squares:
        return 0.0
    dev = squares[0].device
    return math.sqrt(torch.stack([s.to(dev) for s in squares]).sum().item())


def project_l2(
    global_state: Mapping[str, Tensor], local_state: Mapping[str, Tensor], eps: float
) -> dict[str, Tensor]:
    """Project `local` onto the L2 ball of radius `eps` around `global`.

    The norm is that of `update_norm`. Inside the ball: a copy of `local`. Outside: `global + eps * d / ||d||`
    with `d = local - global`. Non-floating entries are copied from `local`.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    norm = update_norm(global_state, local_state)
    if norm <= eps:
        return {k: v.detach().clone() for k, v in local_state.items()}
    return scale_update(global_state, local_state, eps / norm)
