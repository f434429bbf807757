"""DeepSight (Rieger et al., NDSS 2022): suspicious labels, ensemble clustering, suspicious clusters out, clipping."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from flip_fl.config import Config, ConfigError, key
from flip_fl.data import load_datasets
from flip_fl.defenses.deepsight import Logits, OutputLayer, deepsight, division_differences, output_layer
from flip_fl.defenses.updates import BN_STATISTIC_SUFFIXES
from flip_fl.device import torch_device
from flip_fl.models import build_model
from flip_fl.registry import DEFENSES
from flip_fl.seeds import DEFENSE_NOISE, torch_generator
from strategies.defense import Decision, Defense, FloatArray, RoundUpdates


class LocalModels:
    """The round's local models G + u_i run one at a time in one torch module (`logits(i, x)`, i None: G).

    `targets` maps each trained-parameter key of the global state that the module uses to the module's tensor;
    a model is loaded by copying its values into those tensors (in place) when another one was loaded last.

    Args:
        module: the network (already holding the global model's other entries), on `device`, in eval mode.
        targets: global-state key -> the module's tensor for it.
        offsets: global-state key -> its slice of the flat trained-parameter vector.
        base: the global model's flat trained parameters (float64).
        updates: (n, d) the clients' updates of those parameters.
    """

    def __init__(self, module: nn.Module, targets: dict[str, torch.Tensor], offsets: dict[str, slice],
                 base: FloatArray, updates: FloatArray) -> None:
        self.module, self.targets, self.offsets = module, targets, offsets
        self.base, self.updates = base, updates
        self.loaded: int | None = -1  # -1: nothing loaded yet

    def __call__(self, i: int | None, x: torch.Tensor) -> torch.Tensor:
        """Logits of model i (None: the global model) on the batch x."""
        if i != self.loaded:
            flat = self.base if i is None else self.base + self.updates[i]
            with torch.no_grad():
                for k, target in self.targets.items():
                    values = torch.from_numpy(flat[self.offsets[k]].reshape(target.shape))
                    target.copy_(values.to(dtype=target.dtype))
            self.loaded = i
        return self.module(x)


@DEFENSES.register("deepsight")
class DeepSightDefense(Defense):
    """DeepSight: the clipped mean of the models in clusters with few suspicious models.

    Each local model is rebuilt as the global state plus the client's update of the trained parameters; its
    BatchNorm statistics stay the global model's (they are not updates, and the rule never sees them), so
    the DDifs compare trained weights only. The random inputs of a round are drawn from the run's seed, the
    round and the seed index. When the global state is not the configured network's (its keys or shapes
    differ, as in hand-built test models), the DDifs are those of the output layer alone, a linear-softmax
    layer on uniform random features (`defense_ddif_full_network` false).

    Args:
        tau: a cluster is discarded when its share of suspicious models reaches tau.
        num_seeds: S, the number of random input sets (one DDif clustering each).
        num_samples: N, random inputs per seed.
        min_cluster_size: HDBSCAN's minimum cluster size.
        model_fn: a fresh model of the run's architecture.
        image_shape: (C, H, W) of the run's images.
        device: where the local models run.
        seed: the run's seed.
        **kwargs: those of `SeededFedAvg`.
    """

    @dataclass
    class Params:
        """defense.deepsight."""

        tau: float = key(1 / 3, "Threshold tau: a cluster whose share of suspicious models is tau or more is "
                                "discarded.", gt=0.0, le=1.0)
        num_seeds: int = key(3, "Random input sets (seeds) for the DDifs, each clustered on its own.", ge=1)
        num_samples: int = key(20000, "Random inputs per seed for the DDifs.", ge=1)
        min_cluster_size: int = key(2, "HDBSCAN's minimum cluster size (each noise point is a cluster of its "
                                       "own).", ge=2)

    def __init__(self, *, tau: float = 1 / 3, num_seeds: int = 3, num_samples: int = 20000,
                 min_cluster_size: int = 2, model_fn: Callable[[], nn.Module] | None = None,
                 image_shape: tuple[int, int, int] = (1, 28, 28), device: torch.device | None = None,
                 seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tau, self.num_seeds, self.num_samples = tau, num_seeds, num_samples
        self.min_cluster_size, self.model_fn, self.image_shape = min_cluster_size, model_fn, image_shape
        self.device, self.seed = device or torch.device("cpu"), seed
        import sklearn.cluster  # noqa: F401  (heavy: imported now, so its import time is not counted as round 1's cost)

    @classmethod
    def check(cls, params: Any, cfg: Config) -> None:
        """A cluster must fit in a round."""
        n = cfg.federation.clients_per_round
        if params.min_cluster_size > n:
            raise ConfigError(f"defense.deepsight.min_cluster_size: {params.min_cluster_size} exceeds "
                              f"federation.clients_per_round ({n}); no cluster could form")

    @classmethod
    def options(cls, params: Any, cfg: Config) -> dict[str, Any]:
        """The params, the model, the image shape, the device and the seed."""
        test = load_datasets(cfg)[1]
        return {**super().options(params, cfg), "model_fn": lambda: build_model(cfg.model, test),
                "image_shape": test.image_shape, "device": torch_device(cfg.resources.num_gpus), "seed": cfg.seed}

    def trained_shapes(self) -> dict[str, tuple[int, ...]]:
        """The global state's trained entries (BatchNorm statistics left out) and their shapes, in flat order."""
        return {k: tuple(np.shape(v)) for k, v in self.global_state.items()
                if k.rsplit(".", 1)[-1] not in BN_STATISTIC_SUFFIXES}

    def local_models(self, updates: RoundUpdates, layer: OutputLayer) -> tuple[LocalModels, tuple[int, ...], bool]:
        """The round's local models, the shape of one input and whether they are the full network."""
        shapes = self.trained_shapes()
        offsets, pos = {}, 0
        for k, shape in shapes.items():
            size = int(np.prod(shape, dtype=np.int64))
            offsets[k], pos = slice(pos, pos + size), pos + size
        base = np.concatenate([np.asarray(self.global_state[k], dtype=np.float64).ravel() for k in shapes])
        module = self.model_fn() if self.model_fn is not None else None
        full = module is not None and ({k: tuple(v.shape) for k, v in module.state_dict().items()}
                                       == {k: tuple(np.shape(v)) for k, v in self.global_state.items()})
        if module is not None and full:
            module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.global_state.items()})
            module = module.to(self.device).eval()
            state = module.state_dict()
            targets = {k: state[k] for k in shapes}
            input_shape: tuple[int, ...] = tuple(self.image_shape)
        else:
            fan_in = int(np.prod(layer.shape[1:], dtype=np.int64))
            module = nn.Linear(fan_in, layer.num_outputs, bias=layer.bias_key is not None).to(self.device).eval()
            targets = {layer.weight_key: module.weight}
            if layer.bias_key is not None:
                targets[layer.bias_key] = module.bias
            input_shape = (fan_in,)
        return LocalModels(module, targets, offsets, base, updates.matrix), input_shape, full

    def division_differences(self, updates: RoundUpdates, layer: OutputLayer) -> tuple[FloatArray, bool]:
        """The round's DDifs (S, n, P) and whether they come from the full network."""
        logits: Logits
        logits, input_shape, full = self.local_models(updates, layer)
        generators = [torch_generator(self.seed, updates.server_round, DEFENSE_NOISE, s)
                      for s in range(self.num_seeds)]
        ddifs = division_differences(logits, len(updates), input_shape, self.num_samples, generators, self.device)
        return ddifs, full

    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """DeepSight's clipped mean of the accepted models."""
        layer = output_layer(self.trained_shapes())
        ddifs, full = self.division_differences(updates, layer)
        out = deepsight(updates.matrix, ddifs, layer, tau=self.tau, min_cluster_size=self.min_cluster_size)
        info = {**out.info, "ddif_full_network": full}
        return out.delta, Decision(weights=out.weights, kept=out.kept, scales=out.arrays["scale"], info=info)
