"""Backdoor clients: data poisoning, model replacement and norm-bounded (PGD) attacks.

DBA is not a class of its own: with a distributed trigger (`attack.trigger: dba`) attacker i stamps
local piece i (mod the number of pieces), whichever poisoning class it uses.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from clients.benign import BenignClient
from flip_fl.attacks import poisoning
from flip_fl.attacks.triggers import build_trigger
from flip_fl.config import Config, ConfigError
from flip_fl.federation.client import FitResult, RoundInfo, StateDict
from flip_fl.training import AfterStep, sgd, state_on_cpu, train_epochs


class PoisonClient(BenignClient):
    """Continuous data poisoning (BadNets/DBA style) with the attacker's own optimiser and schedule.

    In its attack rounds it stamps the trigger on `attack.poison_fraction` of every minibatch and
    relabels those samples `attack.target_label`; outside them it trains honestly. Attack rounds
    report the L2 norm of the update actually sent (after scaling or projection) as `update_norm`.
    """

    scales_update: ClassVar[bool] = False
    bounds_norm: ClassVar[bool] = False

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Reject attack keys this class would ignore."""
        if cfg.attack.scale != 1.0 and not cls.scales_update:
            raise ConfigError(f"attack.scale: {cls.__name__} does not scale its update; "
                              "use clients.ModelReplacementClient or leave attack.scale at 1.0")
        if cfg.attack.norm_bound is not None and not cls.bounds_norm:
            raise ConfigError(f"attack.norm_bound: {cls.__name__} does not bound its norm; "
                              "use clients.NormBoundedClient or remove attack.norm_bound")

    def fit(self, global_state: StateDict, info: RoundInfo) -> FitResult:
        """In attack rounds, train with the poisoned batches and the attacker's optimiser; otherwise honestly."""
        if not info.attacking:
            return super().fit(global_state, info)
        a, c = self.cfg.attack, self.cfg.training
        model = self.model_from(global_state)
        epochs = a.local_epochs or c.local_epochs
        optimizer = sgd(model, a.lr or c.lr, c.momentum if a.momentum is None else a.momentum,
                        c.weight_decay if a.weight_decay is None else a.weight_decay)
        milestones = sorted({max(1, round(m * epochs)) for m in a.lr_milestones})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, a.lr_gamma)
        trigger = build_trigger(a, self.data.image_shape)
        index = info.attacker_index
        piece = index % trigger.num_pieces if trigger.num_pieces > 1 and index is not None else None

        def poison(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            k = poisoning.num_poison_for_batch(len(x), fraction=a.poison_fraction)
            return poisoning.poison_batch(x, y, trigger, a.target_label, k, piece, a.source_label)

        metrics = train_epochs(model, self.data, optimizer, epochs=epochs, batch_size=c.batch_size,
                               device=self.device, generator=self.generator(info.server_round),
                               transform=poison, on_epoch_end=lambda _: scheduler.step(),
                               after_step=self.step_hook(global_state, model))
        state = self.finalize(global_state, state_on_cpu(model), info)
        return FitResult(state, len(self.data),
                         {**metrics, "attacked": 1.0, "update_norm": poisoning.update_norm(global_state, state)})

    def step_hook(self, global_state: StateDict, model: torch.nn.Module) -> AfterStep | None:
        """Called after each optimiser step with (step, loss) (none for plain poisoning)."""
        return None

    def finalize(self, global_state: StateDict, local_state: StateDict, info: RoundInfo) -> StateDict:
        """Post-process the trained local model before it is sent (identity for plain poisoning)."""
        return local_state


class ModelReplacementClient(PoisonClient):
    """Single-shot model replacement (Bagdasaryan et al. 2020): poison, then scale the update by gamma.

    `attack.scale: auto` uses gamma = clients_per_round / server.lr, which replaces the global model
    under the unweighted mean (the FLIP paper's x100 with 10 clients and eta = 0.1); with example
    weighting it assumes equally sized clients.
    """

    scales_update = True

    def finalize(self, global_state: StateDict, local_state: StateDict, info: RoundInfo) -> StateDict:
        """Scale the update by gamma (`attack.scale`, or clients per round / server lr for `auto`)."""
        gamma = self.cfg.attack.scale
        if gamma == "auto":
            gamma = poisoning.model_replacement_scale(self.cfg.federation.clients_per_round, self.cfg.server.lr)
        return poisoning.scale_update(global_state, local_state, float(gamma))


class NormBoundedClient(PoisonClient):
    """PGD attack (Sun et al. 2019; Wang et al. 2020): keep the update inside an L2 ball of radius eps.

    Projects every `attack.project_every` steps and once more at the end, so norm-clipping defenses
    cannot single the update out by its size.
    """

    bounds_norm = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """The norm bound is required."""
        super().check_config(cfg)
        if cfg.attack.norm_bound is None:
            raise ConfigError("attack.norm_bound: required by clients.NormBoundedClient (the L2 radius eps)")

    def step_hook(self, global_state: StateDict, model: torch.nn.Module) -> AfterStep | None:
        """Project the model onto the ball every `attack.project_every` steps."""
        eps, every = self.cfg.attack.norm_bound, self.cfg.attack.project_every
        assert eps is not None  # check_config
        reference = {k: v.to(self.device) for k, v in global_state.items()}

        def project(step: int, loss: float) -> None:
            if step % every == 0:
                with torch.no_grad():
                    model.load_state_dict(poisoning.project_l2(reference, model.state_dict(), eps))

        return project

    def finalize(self, global_state: StateDict, local_state: StateDict, info: RoundInfo) -> StateDict:
        """Project onto the ball; float32 rounding can leave the norm a hair above eps, so shrink until it is not."""
        eps, margin = self.cfg.attack.norm_bound, 1e-6
        assert eps is not None  # check_config
        state = poisoning.project_l2(global_state, local_state, eps)
        while poisoning.update_norm(global_state, state) > eps:
            state = poisoning.project_l2(global_state, local_state, eps * max(1.0 - margin, 0.0))
            margin *= 10
        return state
