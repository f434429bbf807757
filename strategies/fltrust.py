"""FLTrust (Cao et al., NDSS 2021): trust = ReLU(cos(update, server update)), updates rescaled to its norm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from flip_fl.config import Config, key
from flip_fl.data import ImageDataset
from flip_fl.defenses.fltrust import fltrust
from flip_fl.defenses.updates import bn_statistic_mask, flatten_state
from flip_fl.device import torch_device
from flip_fl.models import build_model
from flip_fl.registry import DEFENSES
from flip_fl.seeds import FLTRUST_TRAINING, torch_generator
from flip_fl.training import LocalTraining, state_on_cpu
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates
from strategies.server_images import ServerImages


@DEFENSES.register("fltrust")
class FLTrustDefense(ServerImages, Defense):
    """FLTrust: each update's trust is ReLU(cos(update, g0)) and it is rescaled to |g0|.

    g0 is the server's own update: each round it trains the global model on its root dataset with
    `trainer` (the benign `training.*` settings), seeded by the run's seed and the round. The root data is
    a seeded draw of `root_size` test images, held out of evaluation (`held_out`).

    Args:
        root: the server's root dataset.
        trainer: the server's local training.
        model_fn: a fresh model of the run's architecture for `root`.
        device: where the server trains.
        seed: the run's seed.
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.fltrust."""

        root_size: int = key(100, "Images of the server's root dataset, a seeded draw from the test set that is then "
                                  "excluded from evaluation.", ge=1)

    def __init__(self, *, root: ImageDataset, trainer: LocalTraining, model_fn: Callable[[], nn.Module],
                 device: torch.device, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root, self.trainer, self.model_fn, self.device, self.seed = root, trainer, model_fn, device, seed

    @classmethod
    def options(cls, params: Any, cfg: Config) -> dict[str, Any]:
        """The root data, the benign trainer, the model, the device and the seed."""
        root = cls.server_images(params, cfg)
        return {"root": root, "trainer": LocalTraining.from_config(cfg.training),
                "model_fn": lambda: build_model(cfg.model, root), "device": torch_device(cfg.resources.num_gpus),
                "seed": cfg.seed}

    def server_update(self, server_round: int) -> FloatArray:
        """g0 (trained parameters only): one round of benign local training on the root data."""
        model = self.model_fn()
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.global_state.items()})
        model = model.to(self.device)
        self.trainer.run(model, self.root, self.device, torch_generator(self.seed, server_round, FLTRUST_TRAINING))
        keys = list(self.global_state)
        local = {k: v.numpy() for k, v in state_on_cpu(model).items()}
        g0 = flatten_state([local], keys)[0] - flatten_state([self.global_state], keys)[0]
        return g0[~bn_statistic_mask(self.global_state)]

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """FLTrust's trust-weighted, rescaled mean."""
        out = fltrust(updates.matrix, self.server_update(updates.server_round))
        return out.delta, Decision.of(out, kept=True, scales=True)
