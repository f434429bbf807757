"""FLIP benign client (Zhang et al., ICLR 2023): invert candidate triggers from the global model, harden against them.

Each round, on its own data and with no knowledge of any real trigger, the client runs the schedule
`flip_defense.schedule` names and returns the hardened model:

- `official` (`flip_fl.defenses.flip_defense.official`): the official code's per-batch schedule, hardening with
  Adam (`flip_defense.lr`, `flip_defense.betas`);
- `fast` (`flip_fl.defenses.flip_defense.fast`): one budgeted batched inversion whose triggers harden every
  batch, with SGD (`flip_defense.fast.lr`, `training.momentum`, `training.weight_decay`).

Its trigger cache (`flip_fl.defenses.flip_defense.cache.TriggerCache`: sizes, warm-up flag, recent triggers in
float16) lives in `self.state`, which the server keeps per partition (and checkpoints), so it follows the
partition across rounds, survives a resume and never leaks between partitions. See docs/FLIP.md.
"""

from __future__ import annotations

import numpy as np
import torch

from clients.benign import BenignClient
from flip_fl.defenses.flip_defense.cache import TriggerCache
from flip_fl.defenses.flip_defense.round import FlipRound, RoundStreams
from flip_fl.federation.client import ClientState, FitResult, RoundInfo, StateDict
from flip_fl.registry import FLIP_SCHEDULES
from flip_fl.seeds import ClientStream
from flip_fl.training import sgd, state_on_cpu

CACHE_PREFIX = "flip/"


class FlipDefenseClient(BenignClient):
    """Benign client that hardens the model against inverted triggers (the `flip_defense.*` settings).

    With `flip_defense.harden: false` it trains exactly like `BenignClient` (ablation without hardening).
    Metrics per round: `invert_seconds`, `harden_seconds` (stamping and training steps), `flip_warmup`
    (1 on a first selection), `flip_inversions` (inversion calls), `flip_inversion_steps`,
    `flip_inversion_images` (images x steps: the inversion's work), `flip_directions` (triggers
    inverted), `flip_triggers_found` (within the size cap), `flip_images_stamped`,
    `flip_batches_trained`, `flip_batches_skipped`, `train_loss`, `train_steps`.
    """

    def fit(self, global_state: StateDict, info: RoundInfo) -> FitResult:
        """Run the configured schedule on the global model (plain training without `flip_defense.harden`)."""
        if not self.cfg.flip_defense.harden:
            return super().fit(global_state, info)
        cache = self.load_cache()
        model = self.model_from(global_state)
        flip_round = FlipRound(model, self.optimizer(model), self.data, self.cfg.flip_defense, cache, self.device,
                               self.streams(info.server_round),
                               self.cfg.flip_defense.batch_size or self.cfg.training.batch_size)
        FLIP_SCHEDULES.lookup(self.cfg.flip_defense.schedule)(flip_round, not cache.warmed_up)
        self.save_cache(cache)
        return FitResult(state_on_cpu(model), len(self.data), flip_round.metrics())

    def streams(self, server_round: int) -> RoundStreams:
        """The round's random streams (`flip_fl.seeds.ClientStream`)."""
        pair_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator(server_round, ClientStream.PAIRS)))
        return RoundStreams(batches=self.generator(server_round, ClientStream.BATCHES),
                            invert=self.generator(server_round, ClientStream.INVERT),
                            stamp=self.generator(server_round, ClientStream.STAMP),
                            pairs=np.random.default_rng(pair_seed))

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The hardening optimiser: the official Adam or fast's SGD.

        Adam uses `flip_defense.lr` and `flip_defense.betas`; SGD uses `flip_defense.fast.lr`.
        """
        f, c = self.cfg.flip_defense, self.cfg.training
        if f.schedule == "official":
            return torch.optim.Adam(model.parameters(), lr=f.lr, betas=(f.betas[0], f.betas[1]))
        return sgd(model, f.fast.lr, c.momentum, c.weight_decay)

    def load_cache(self) -> TriggerCache:
        """This partition's cache from `self.state` (a fresh one on its first selection)."""
        arrays = cache_arrays(self.state)
        if not arrays:
            return TriggerCache(num_classes=self.data.num_classes)
        cache = TriggerCache.from_arrays(arrays)
        if cache.num_classes != self.data.num_classes:
            raise ValueError(f"the FLIP cache of partition {self.partition_id} has {cache.num_classes} classes, "
                             f"the data {self.data.num_classes}")
        return cache

    def save_cache(self, cache: TriggerCache) -> None:
        """Store the cache in `self.state` (triggers as float16, at most `flip_defense.max_cached_triggers` pairs)."""
        cache.prune(self.cfg.flip_defense.max_cached_triggers)
        arrays = cache.to_arrays()
        for name in ("masks", "patterns"):
            arrays[name] = arrays[name].astype(np.float16)
        for k in cache_arrays(self.state):
            del self.state.arrays[CACHE_PREFIX + k]
        self.state.arrays.update({CACHE_PREFIX + k: v for k, v in arrays.items()})


def cache_arrays(state: ClientState) -> dict[str, np.ndarray]:
    """The FLIP cache's arrays in a client state, without their `CACHE_PREFIX` (empty before a first fit)."""
    return {k[len(CACHE_PREFIX):]: v for k, v in state.arrays.items() if k.startswith(CACHE_PREFIX)}
