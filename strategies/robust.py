"""Defenses written here on top of the numpy rules in `flip_fl.robust`.

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
from flwr.app import ArrayRecord, Message, MetricRecord

from flip_fl import robust
from flip_fl.config import Config
from flip_fl.data import ImageDataset, load_datasets
from flip_fl.models import build_model
from flip_fl.robust import AggregationOutcome, flatten_state
from flip_fl.schema import ConfigError
from flip_fl.training import sgd, state_on_cpu, train_epochs
from strategies.defense import Decision, DefenseStrategy, assumed_malicious


class DeltaDefense(DefenseStrategy):
    """A rule on the trained parameters' updates; subclasses implement `rule`."""

    def aggregate_rule(self, server_round: int,
                       replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None, Decision | None]:
        updates = self.client_updates(replies)
        params = self.parameter_mask()
        delta = np.zeros(updates.shape[1])
        delta[params], decision = self.rule(server_round, replies, updates[:, params])
        assert decision.weights is not None
        delta[~params] = decision.weights @ updates[:, ~params]
        return self.model_from_delta(delta), self.train_metrics(replies), decision

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        """(aggregate update, decision with per-client weights) from the parameter update matrix."""
        raise NotImplementedError

    def rng(self, server_round: int) -> np.random.Generator:
        """The noise stream of a round: same seed and round, same noise."""
        return np.random.default_rng([self.cfg.seed, server_round, 0xDEF])


def _decision(outcome: AggregationOutcome, kept: bool = False, scales: bool = False) -> Decision:
    return Decision(weights=outcome.weights, kept=outcome.kept if kept else None,
                    scales=outcome.arrays["scale"] if scales else None, info=dict(outcome.info))


def clip_bound(cfg: Config, updates: np.ndarray) -> float:
    """defense.clip_norm, or the median update norm of the round when it is null."""
    if cfg.defense.clip_norm is not None:
        return cfg.defense.clip_norm
    norms = np.linalg.norm(updates, axis=1)
    return float(np.median(norms)) or float(norms.max()) or 1.0


class NormClipDefense(DeltaDefense):
    """Norm clipping (Sun et al. 2019): every update scaled into an L2 ball of radius defense.clip_norm."""

    name = "norm_clip"

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        out = robust.norm_clip(updates, clip_bound(self.cfg, updates), self.example_weights(replies))
        return out.delta, _decision(out, scales=True)


class WeakDPDefense(DeltaDefense):
    """Weak DP (Sun et al. 2019): norm clipping, then Gaussian noise of std defense.noise_std on the model.

    Not Flower's DifferentialPrivacyServerSideFixedClipping: that wrapper draws from numpy's global,
    unseeded generator (runs would not repeat), adds noise to every entry including BatchNorm
    statistics and integer counters, sizes it as noise_multiplier * clip / n, and wraps the strategy
    from outside, so our per-round records and server learning rate would not see it.
    """

    name = "weak_dp"

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        d = self.cfg.defense
        out = robust.weak_dp(updates, clip_bound(self.cfg, updates), d.noise_std / self.cfg.server.lr,
                             self.rng(server_round), self.example_weights(replies))
        out.info["noise_std"] = d.noise_std
        return out.delta, _decision(out, scales=True)


class RFADefense(DeltaDefense):
    """RFA (Pillutla et al. 2022): the (example-weighted) geometric median by smoothed Weiszfeld."""

    name = "rfa"

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        out = robust.geometric_median(updates, self.example_weights(replies), iters=self.cfg.defense.rfa_iters)
        return out.delta, _decision(out)


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
        params = [k for k in self.global_state if k.rsplit(".", 1)[-1] not in robust.BN_STATISTIC_SUFFIXES]
        layer = params[-1].rsplit(".", 1)[0] + "."
        return np.concatenate([np.full(self.global_state[k].size, k.startswith(layer)) for k in params])

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        clients = [self.partition_of[m.metadata.src_node_id] for m in replies]
        mask = self.feature_mask()
        width = updates.shape[1] if mask is None else int(mask.sum())
        history = np.stack([self.history.get(pid, np.zeros(width, dtype=np.float32)) for pid in clients])
        out = robust.foolsgold(updates, history, confidence=self.cfg.defense.foolsgold_confidence,
                               similarity_mask=mask)
        for pid, row in zip(clients, out.arrays["history"]):
            self.history[pid] = row.astype(np.float32)
        return out.delta, _decision(out, kept=True)


class RLRDefense(DeltaDefense):
    """Robust learning rate (Ozdayi et al. 2021): coordinates where fewer than theta clients agree in
    sign get the server learning rate negated."""

    name = "rlr"

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        theta = self.cfg.defense.rlr_threshold
        if theta is None:
            theta = assumed_malicious(self.cfg) + 1
        out = robust.robust_lr(updates, min(float(theta), len(replies)), 1.0, self.example_weights(replies))
        return out.delta, _decision(out)


def root_split(cfg: Config, test_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(root indices, evaluation indices) of the test set: a seeded draw of defense.root_size images."""
    k = cfg.defense.root_size
    if k >= test_size:
        raise ConfigError(f"defense.root_size: {k} root images cannot be held out of a test set of {test_size}")
    order = np.random.default_rng([cfg.seed, 0xF17]).permutation(test_size)
    return np.sort(order[:k]), np.sort(order[k:])


def evaluation_set(cfg: Config, test: ImageDataset) -> ImageDataset:
    """The images the global model is evaluated on: the test set, minus FLTrust's root data."""
    if cfg.defense.name != "fltrust":
        return test
    return test.subset(root_split(cfg, len(test))[1])


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
        out = robust.fltrust(updates, self.server_update(server_round))
        return out.delta, _decision(out, kept=True, scales=True)


class FLAMEDefense(DeltaDefense):
    """FLAME (Nguyen et al. 2022): HDBSCAN on cosine distances of the parameter updates, clipping to
    their median norm, Gaussian noise of std defense.flame_lambda * median norm on the model."""

    name = "flame"

    def __init__(self, cfg: Config, node_partitions: dict[int, int], base_config: dict[str, str]) -> None:
        super().__init__(cfg, node_partitions, base_config)
        import sklearn.cluster  # noqa: F401  (imported now, so its import time is not counted as round 1's cost)

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        lam = self.cfg.defense.flame_lambda
        out = robust.flame(updates, clustering_mask=None, noise_lambda=lam / self.cfg.server.lr,
                           rng=self.rng(server_round))
        out.info["noise_std"] = lam * out.info["clip_norm"]
        return out.delta, _decision(out, kept=True, scales=True)
