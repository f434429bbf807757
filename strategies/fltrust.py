"""FLTrust (Cao et al., NDSS 2021): trust = ReLU(cos(update, server update)), updates rescaled to its norm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from flip_fl.config import Config, ConfigError, key
from flip_fl.data import ImageDataset, load_datasets
from flip_fl.defenses.fltrust import fltrust, root_split
from flip_fl.defenses.updates import bn_statistic_mask, flatten_state
from flip_fl.device import torch_device
from flip_fl.models import build_model
from flip_fl.registry import DEFENSES
from flip_fl.seeds import FLTRUST_TRAINING, torch_generator
from flip_fl.training import LocalTraining, state_on_cpu
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates


@DEFENSES.register("fltrust")
class FLTrustDefense(Defense):
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
    def check(cls, params: Any, cfg: Config) -> None:
        """The root data must leave test images to evaluate on."""
        syn = cfg.data.synthetic
        if cfg.data.name == "synthetic" and params.root_size >= syn.test_size:
            raise ConfigError(f"defense.fltrust.root_size: {params.root_size} root images cannot be held out of "
                              f"data.synthetic.test_size = {syn.test_size}")

    @classmethod
    def held_out(cls, params: Any, cfg: Config, test_size: int) -> np.ndarray:
        """The test images the server keeps as its root data (excluded from evaluation)."""
        try:
            return root_split(cfg.seed, params.root_size, test_size)[0]
        except ValueError as err:
            raise ConfigError(f"defense.fltrust.root_size: {err}") from None

    @classmethod
    def options(cls, params: Any, cfg: Config) -> dict[str, Any]:
        """The root data, the benign trainer, the model, the device and the seed."""
        test = load_datasets(cfg)[1]
        root = test.subset(cls.held_out(params, cfg, len(test)))
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
