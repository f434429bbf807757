"""FLARE (Wang et al., AsiaCCS 2022): trust from the MMD of the local models' penultimate-layer representations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Message
from torch import nn

from flip_fl.config import Config, ConfigError, key
from flip_fl.data import ImageDataset
from flip_fl.defenses.flare import flare
from flip_fl.defenses.updates import bn_statistic_mask, flatten_state, unflatten
from flip_fl.device import torch_device
from flip_fl.models import build_model
from flip_fl.registry import DEFENSES
from flip_fl.training import batch_indices
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates
from strategies.server_images import ServerImages


def penultimate_layer(model: nn.Module) -> nn.Linear:
    """The model's last `nn.Linear` (in `modules()` order), whose input is the penultimate-layer representation."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer whose input FLARE could read")
    return linear[-1]


@torch.no_grad()
def penultimate_representations(model: nn.Module, data: ImageDataset, device: torch.device,
                                batch_size: int) -> FloatArray:
    """(len(data), features) float64: the input of the model's last nn.Linear on `data`, in eval mode."""
    captured: list[torch.Tensor] = []
    handle = penultimate_layer(model).register_forward_pre_hook(
        lambda _module, args: captured.append(args[0].detach().flatten(1).double().cpu()))
    try:
        model.eval()
        for idx in batch_indices(len(data), batch_size, torch.Generator(), shuffle=False):
            model(data.batch(idx)[0].to(device))
    finally:
        handle.remove()
    return torch.cat(captured).numpy()


@DEFENSES.register("flare")
class FLAREDefense(ServerImages, Defense):
    """FLARE: each update weighted by a softmax trust score from MMD nearest-neighbour votes between local models.

    Each round the server rebuilds every local model (global model + the client's whole update, BatchNorm
    statistics included), reads its penultimate-layer representation (the input of its last `nn.Linear`)
    on `root_size` server images, computes the pairwise MMD between the clients' representation sets, lets
    every client vote for its floor(n / 2) - 1 nearest others and weights client i by
    exp(c_i / (tau * mean c)) / sum_j exp(c_j / (tau * mean c)), c_i its votes. The server images are a
    seeded draw of test images held out of evaluation (as FLTrust's root data, `held_out`). Trust is soft:
    the decision has weights, no rejections.

    Args:
        root: the server's images.
        model_fn: a fresh model of the run's architecture for `root`.
        device: where the server runs the local models.
        tau: the softmax temperature.
        batch_size: images per forward pass.
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.flare."""

        root_size: int = key(200, "Server images the local models' penultimate-layer representations are computed "
                                  "on, a seeded draw from the test set that is then excluded from evaluation.", ge=2)
        tau: float = key(1.0, "Temperature of the trust softmax exp(c_i / (tau * mean c)), c_i the client's "
                              "nearest-neighbour votes.", gt=0.0)

    def __init__(self, *, root: ImageDataset, model_fn: Callable[[], nn.Module], device: torch.device,
                 tau: float = 1.0, batch_size: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root, self.model_fn, self.device, self.tau, self.batch_size = root, model_fn, device, tau, batch_size
        self.replies_updates: FloatArray | None = None

    @classmethod
    def options(cls, params: Any, cfg: Config) -> dict[str, Any]:
        """The server images, the model, the device, tau and the evaluation batch size."""
        root = cls.server_images(params, cfg)
        try:
            penultimate_layer(build_model(cfg.model, root))
        except ValueError as err:
            raise ConfigError(f"model.name: defense.name=flare needs a classifier head: {err}") from None
        return {"root": root, "model_fn": lambda: build_model(cfg.model, root), "tau": params.tau,
                "device": torch_device(cfg.resources.num_gpus), "batch_size": cfg.server.eval_batch_size}

    def client_updates(self, replies: list[Message]) -> FloatArray:
        """The round's whole update matrix, remembered: the local models include their BatchNorm statistics."""
        self.replies_updates = super().client_updates(replies)
        return self.replies_updates

    def representations(self, updates: FloatArray) -> list[FloatArray]:
        """Each local model's penultimate-layer representations of the server images.

        `updates`: (n, D) the clients' updates of every global-model entry (BatchNorm statistics included);
        local model i = global + updates[i].
        """
        keys = list(self.global_state)
        base = flatten_state([self.global_state], keys)[0]
        model = self.model_fn().to(self.device)
        out = []
        for row in updates:
            state = unflatten(base + row, self.global_state)
            model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
            out.append(penultimate_representations(model, self.root, self.device, self.batch_size))
        return out

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """FLARE's trust-weighted sum of the parameter updates (soft: weights, no rejections)."""
        full = self.replies_updates
        params = ~bn_statistic_mask(self.global_state)
        if full is None or full.shape[0] != len(updates) or not np.array_equal(full[:, params], updates.matrix):
            raise ValueError("FLARE rebuilds the local models from the replies of the round (client_updates); "
                             "its rule cannot run on other updates")
        self.replies_updates = None
        out = flare(updates.matrix, self.representations(full), self.tau)
        return out.delta, Decision.of(out)
