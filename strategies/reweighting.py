"""Defenses that reweight clients by how they relate to each other or to the server: RFA, FoolsGold, RLR, FLTrust.

Each rule sees the update matrix of the trained parameters (delta_i = local_i - global, one row per
sorted reply) and returns an aggregate update and per-client weights. BatchNorm statistics (running
mean/var, batch counters) are not updates of trained weights -- the counters alone would dominate
norms and cosines -- so they never enter a rule: their aggregate is the weighted mean of the clients'
statistics with the rule's weights (a rejected client contributes nothing). The strategy hands back
global + delta, so SeededFedAvg applies the same server learning rate as everywhere else:
global += server.lr * delta. Noise is specified as the std that reaches the global model (the rules
add it to the delta, hence the division by server.lr) and only touches trained parameters.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Message

from flip_fl.config import Config
from flip_fl.data import load_datasets
from flip_fl.defenses.fltrust import fltrust, root_split
from flip_fl.defenses.foolsgold import foolsgold
from flip_fl.defenses.rfa import geometric_median
from flip_fl.defenses.rlr import robust_lr
from flip_fl.defenses.updates import BN_STATISTIC_SUFFIXES, flatten_state
from flip_fl.models import build_model
from flip_fl.training import sgd, state_on_cpu, train_epochs
from strategies.defense import Decision, DeltaDefense, assumed_malicious, outcome_decision


class RFADefense(DeltaDefense):
    """RFA (Pillutla et al. 2022): the (example-weighted) geometric median by smoothed Weiszfeld."""

    name = "rfa"

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        out = geometric_median(updates, self.example_weights(replies), iters=self.cfg.defense.rfa_iters)
        return out.delta, outcome_decision(out)


class FoolsGoldDefense(DeltaDefense):
    """FoolsGold (Fung et al. 2020): clients whose accumulated updates look alike are down-weighted.

    The history of every partition id lives in the strategy (float32) and grows whenever that
    partition is sampled; `defense.foolsgold_features` picks the compared coordinates.
    """

    name = "foolsgold"

    def __init__(self, cfg: Config, node_partitions: dict[int, int], base_config: dict[str, str]) -> None:
        super().__init__(cfg, node_partitions, base_config)
        self.history: dict[int, np.ndarray] = {}

    def feature_mask(self) -> np.ndarray | None:
        """Compared parameter coordinates: all (None), or those of the output layer."""
        if self.cfg.defense.foolsgold_features == "all":
            return None
        params = [k for k in self.global_state if k.rsplit(".", 1)[-1] not in BN_STATISTIC_SUFFIXES]
        layer = params[-1].rsplit(".", 1)[0] + "."
        return np.concatenate([np.full(self.global_state[k].size, k.startswith(layer)) for k in params])

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        clients = [self.partition_of[m.metadata.src_node_id] for m in replies]
        mask = self.feature_mask()
        width = updates.shape[1] if mask is None else int(mask.sum())
        history = np.stack([self.history.get(pid, np.zeros(width, dtype=np.float32)) for pid in clients])
        out = foolsgold(updates, history, confidence=self.cfg.defense.foolsgold_confidence,
                               similarity_mask=mask)
        for pid, row in zip(clients, out.arrays["history"]):
            self.history[pid] = row.astype(np.float32)
        return out.delta, outcome_decision(out, kept=True)


class RLRDefense(DeltaDefense):
    """Robust learning rate (Ozdayi et al. 2021).

    Coordinates where fewer than theta clients agree in sign get the server learning rate negated.
    """

    name = "rlr"

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        theta = self.cfg.defense.rlr_threshold
        if theta is None:
            theta = assumed_malicious(self.cfg) + 1
        out = robust_lr(updates, min(float(theta), len(replies)), 1.0, self.example_weights(replies))
        return out.delta, outcome_decision(out)


class FLTrustDefense(DeltaDefense):
    """FLTrust (Cao et al. 2021): trust = ReLU(cos(update, g0)), updates rescaled to |g0|.

    g0 is the server's own update: each round it trains the global model on its root dataset
    (defense.root_size test images drawn with the seed and held out of evaluation) with the benign
    client settings (client.*).
    """

    name = "fltrust"

    def __init__(self, cfg: Config, node_partitions: dict[int, int], base_config: dict[str, str]) -> None:
        super().__init__(cfg, node_partitions, base_config)
        test = load_datasets(cfg)[1]
        self.root = test.subset(root_split(cfg, len(test))[0])
        use_cuda = cfg.resources.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")

    def server_update(self, server_round: int) -> np.ndarray:
        """g0 (trained parameters only): one round of benign local training on the root data."""
        c = self.cfg.client
        model = build_model(self.cfg.model, self.root)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.global_state.items()})
        model = model.to(self.device)
        seed = np.random.SeedSequence([self.cfg.seed, server_round, 0xF1]).generate_state(1)[0]
        train_epochs(model, self.root, sgd(model, c.lr, c.momentum, c.weight_decay), epochs=c.local_epochs,
                     batch_size=c.batch_size, device=self.device, generator=torch.Generator().manual_seed(int(seed)),
                     max_batches=c.max_batches)
        keys = list(self.global_state)
        local = {k: v.numpy() for k, v in state_on_cpu(model).items()}
        g0 = flatten_state([local], keys)[0] - flatten_state([self.global_state], keys)[0]
        return g0[self.parameter_mask()]

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        out = fltrust(updates, self.server_update(server_round))
        return out.delta, outcome_decision(out, kept=True, scales=True)
