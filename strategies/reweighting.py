"""Defenses that reweight clients by how they relate to each other or to the server: RFA, FoolsGold, RLR, FLTrust.

The rules are numpy functions of the trained parameters' updates (`flip_fl.defenses.rfa`, `.foolsgold`,
`.rlr`, `.fltrust`); see `strategies.defense.DeltaDefense` for how BatchNorm statistics and the server
learning rate are handled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import Message
from torch import nn

from flip_fl.data import ImageDataset
from flip_fl.defenses.fltrust import fltrust
from flip_fl.defenses.foolsgold import foolsgold
from flip_fl.defenses.rfa import geometric_median
from flip_fl.defenses.rlr import robust_lr
from flip_fl.defenses.updates import BN_STATISTIC_SUFFIXES, flatten_state
from flip_fl.registry import DEFENSES
from flip_fl.seeds import FLTRUST_TRAINING, torch_generator
from flip_fl.training import LocalTraining, state_on_cpu
from strategies.defense import Decision, DeltaDefense, outcome_decision


@DEFENSES.register("rfa")
class RFADefense(DeltaDefense):
    """RFA (Pillutla et al. 2022): the (example-weighted) geometric median by smoothed Weiszfeld.

    Args:
        iters: maximum Weiszfeld iterations.
        **kwargs: those of `SeededFedAvg`.
    """

    name = "rfa"

    def __init__(self, *, iters: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iters = iters

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        """The geometric median of the updates; the decision holds the Weiszfeld weights."""
        out = geometric_median(updates, self.example_weights(replies), iters=self.iters)
        return out.delta, outcome_decision(out)


@DEFENSES.register("foolsgold")
class FoolsGoldDefense(DeltaDefense):
    """FoolsGold (Fung et al. 2020): clients whose accumulated updates look alike are down-weighted.

    The history of every partition id lives in the strategy (float32) and grows whenever that
    partition is sampled.

    Args:
        features: the compared coordinates: all trained parameters, or those of the output layer.
        confidence: kappa of the logit re-weighting.
        **kwargs: those of `SeededFedAvg`.
    """

    name = "foolsgold"

    def __init__(self, *, features: Literal["all", "output_layer"] = "all", confidence: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.features, self.confidence = features, confidence
        self.history: dict[int, np.ndarray] = {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The client histories, as `history/<partition id>` (checkpointed: a resumed run continues them)."""
        return {f"history/{pid}": row.copy() for pid, row in sorted(self.history.items())}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the client histories of a `state_dict`."""
        bad = [k for k in state if not k.startswith("history/")]
        if bad:
            raise ValueError(f"FoolsGold state has unexpected entries {bad[:3]}")
        self.history = {int(k.split("/", 1)[1]): np.asarray(v, dtype=np.float32) for k, v in state.items()}

    def feature_mask(self) -> np.ndarray | None:
        """Compared parameter coordinates: all (None), or those of the output layer."""
        if self.features == "all":
            return None
        params = [k for k in self.global_state if k.rsplit(".", 1)[-1] not in BN_STATISTIC_SUFFIXES]
        layer = params[-1].rsplit(".", 1)[0] + "."
        return np.concatenate([np.full(self.global_state[k].size, k.startswith(layer)) for k in params])

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        """FoolsGold's weighted mean; the clients' histories are updated."""
        clients = [self.partition_of[m.metadata.src_node_id] for m in replies]
        mask = self.feature_mask()
        width = updates.shape[1] if mask is None else int(mask.sum())
        history = np.stack([self.history.get(pid, np.zeros(width, dtype=np.float32)) for pid in clients])
        out = foolsgold(updates, history, confidence=self.confidence, similarity_mask=mask)
        for pid, row in zip(clients, out.arrays["history"]):
            self.history[pid] = row.astype(np.float32)
        return out.delta, outcome_decision(out, kept=True)


@DEFENSES.register("rlr")
class RLRDefense(DeltaDefense):
    """Robust learning rate (Ozdayi et al. 2021).

    Coordinates where fewer than theta clients agree in sign get the server learning rate negated.

    Args:
        threshold: theta (capped at the round's replies).
        **kwargs: those of `SeededFedAvg`.
    """

    name = "rlr"

    def __init__(self, *, threshold: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        """The mean with sign-disputed coordinates reversed."""
        out = robust_lr(updates, min(float(self.threshold), len(replies)), 1.0, self.example_weights(replies))
        return out.delta, outcome_decision(out)


@DEFENSES.register("fltrust")
class FLTrustDefense(DeltaDefense):
    """FLTrust (Cao et al. 2021): trust = ReLU(cos(update, g0)), updates rescaled to |g0|.

    g0 is the server's own update: each round it trains the global model on its root dataset with
    `trainer` (the benign client settings), seeded by the run's seed and the round.

    Args:
        root: the server's root dataset (held out of evaluation, `flip_fl.defenses.fltrust.root_split`).
        trainer: the server's local training.
        model_fn: a fresh model of the run's architecture for `root`.
        device: where the server trains.
        seed: the run's seed.
        **kwargs: those of `SeededFedAvg`.
    """

    name = "fltrust"

    def __init__(self, *, root: ImageDataset, trainer: LocalTraining, model_fn: Callable[[], nn.Module],
                 device: torch.device, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root, self.trainer, self.model_fn, self.device, self.seed = root, trainer, model_fn, device, seed

    def server_update(self, server_round: int) -> np.ndarray:
        """g0 (trained parameters only): one round of benign local training on the root data."""
        model = self.model_fn()
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.global_state.items()})
        model = model.to(self.device)
        self.trainer.run(model, self.root, self.device, torch_generator(self.seed, server_round, FLTRUST_TRAINING))
        keys = list(self.global_state)
        local = {k: v.numpy() for k, v in state_on_cpu(model).items()}
        g0 = flatten_state([local], keys)[0] - flatten_state([self.global_state], keys)[0]
        return g0[self.parameter_mask()]

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        """FLTrust's trust-weighted, rescaled mean."""
        out = fltrust(updates, self.server_update(server_round))
        return out.delta, outcome_decision(out, kept=True, scales=True)
