"""FLIP benign client (Zhang et al., ICLR 2023): invert candidate triggers from the global model, harden against them.

Each round, on its own data and with no knowledge of any real trigger:

1. Warm-up, the first time this partition is selected: one batched universal inversion over every
   target class (sources: `flip.samples_per_class` local images of every other class) fills the
   class x class matrix of trigger sizes (`TriggerCache.mask_sizes`) and caches the universal triggers.
   With `flip.refresh_steps` > 0 (an extension) it is repeated, warm-started, on every later selection.
2. Universal batches (`flip.universal_batches`, as in the official warm-up): the first batches after a
   warm-up are hardened with the universal triggers within the size cap, one target per batch.
3. Pair batches (at most `flip.max_batches` batches in all, over `flip.local_epochs`): every
   `flip.pair_every` batches a (source, target) pair is chosen among the sources present in the batch,
   at random with probability `flip.explore`, otherwise the pair with the smallest known trigger.
   Each batch of the pair's window inverts s->t (and t->s when `flip.symmetric` and both classes are
   present) on the batch's own images of those classes, in one batched call; the first batch uses
   `flip.pair_steps` steps, later batches `flip.repeat_steps` warm-started from the previous trigger.
   The sizes found update the matrix; triggers are cached as warm starts.
4. Hardening: `flip.portion` of the eligible images (the source-class images of each trigger found
   within the cap) are stamped, labels stay true, and the model (in train mode) takes one Adam step.
   A batch in which the pair's source class is missing is skipped, as in the official code.

The cache (sizes, warm-up flag, recent triggers in float16) lives in `self.state`, which Flower keeps per
node in `context.state`, so it follows the partition across rounds and never leaks between partitions.
See docs/FLIP.md for the schedule, the defaults per dataset and the deviations from the official code.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clients.benign import BenignClient
from flip_fl.defenses.flip.hardening import UNIVERSAL, TriggerCache, harden_batch
from flip_fl.defenses.flip.inversion import InversionSettings, invert_triggers, universal_tasks
from flip_fl.federation.client import ClientState, FitResult, RoundInfo, StateDict
from flip_fl.seeds import ClientStream
from flip_fl.training import batch_indices, state_on_cpu

CACHE_PREFIX = "flip/"
MIN_CLASS_IMAGES = 2  # a class takes part in a batch's inversion only with at least this many images (official: > 1)
STREAM_BATCHES, STREAM_INVERT, STREAM_STAMP, STREAM_PAIRS = (ClientStream.BATCHES, ClientStream.INVERT,
                                                            ClientStream.STAMP, ClientStream.PAIRS)

Direction = tuple[int, int]
Trigger = tuple[torch.Tensor, torch.Tensor]


class FlipDefenseClient(BenignClient):
    """Benign client that hardens the model against inverted triggers (the `flip.*` settings).

    With `flip.harden: false` it trains exactly like `BenignClient` (ablation without hardening).
    Metrics per round: `invert_seconds`, `harden_seconds` (stamping and training steps), `flip_warmup` /
    `flip_refresh` (1 in a warm-up / refresh round), `flip_warmup_found` (universal triggers within the
    cap), `flip_universal_batches`, `flip_inversions` (pair inversion calls), `flip_directions`
    (directions inverted), `flip_triggers_found` (pair triggers within the cap), `flip_images_stamped`,
    `flip_batches_trained`, `flip_batches_skipped`, `train_loss`, `train_steps`.
    """

    def fit(self, global_state: StateDict, info: RoundInfo) -> FitResult:
        """Warm up or refresh the triggers, then harden the global model (plain training without `flip.harden`)."""
        if not self.cfg.flip.harden:
            return super().fit(global_state, info)
        model = self.model_from(global_state)
        cache = self.load_cache()
        stats = dict.fromkeys(("invert_seconds", "harden_seconds", "flip_warmup", "flip_refresh", "flip_warmup_found",
                               "flip_universal_batches", "flip_inversions", "flip_directions", "flip_triggers_found",
                               "flip_images_stamped", "flip_batches_trained", "flip_batches_skipped"), 0.0)
        inv_gen = self.generator(info.server_round, STREAM_INVERT)
        refresh = cache.warmed_up and self.cfg.flip.refresh_steps > 0
        universal: list[tuple[int, Trigger]] = []
        if not cache.warmed_up or refresh:
            start = time.perf_counter()
            steps = self.cfg.flip.refresh_steps if refresh else self.cfg.flip.warmup_steps
            universal = self.warm_up(model, cache, steps, inv_gen)
            stats["flip_warmup_found"] = float(len(universal))
            stats["flip_refresh" if refresh else "flip_warmup"] = 1.0
            stats["invert_seconds"] += time.perf_counter() - start
        loss_sum = self.harden(model, cache, info, inv_gen, stats, universal if self.cfg.flip.universal_batches else [])
        steps = stats["flip_batches_trained"]  # type: ignore[assignment]
        self.save_cache(cache)
        return FitResult(state_on_cpu(model), len(self.data),
                         {**stats, "train_loss": loss_sum / max(steps, 1.0), "train_steps": steps})

    # ------------------------------------------------------------------ inversion

    def settings(self, steps: int) -> InversionSettings:
        """Inversion hyperparameters from `flip.*` for a run of `steps` steps."""
        f = self.cfg.flip
        return InversionSettings(steps=steps, init_cost=f.init_cost, success_threshold=f.success_threshold,
                                 max_mask_fraction=f.max_mask_fraction, reinit_noise=f.reinit_noise)

    def warm_up(self, model: nn.Module, cache: TriggerCache, steps: int,
                generator: torch.Generator) -> list[tuple[int, Trigger]]:
        """Universal inversion for every target at once (warm-started from cached universal triggers).

        Records every size and trigger in the cache; returns the (target, trigger) pairs within the size cap.
        """
        per_class = self.cfg.flip.samples_per_class
        labels = self.data.labels
        images = {}
        for c in range(self.data.num_classes):
            idx = torch.nonzero(labels == c).flatten()
            if len(idx):
                images[c] = self.data.batch(idx[torch.randperm(len(idx), generator=generator)[:per_class]])[0]
        tasks = universal_tasks(images, self.data.num_classes, per_class)
        init_m, init_p = self.warm_starts([cache.get_trigger(UNIVERSAL, t) for t in range(len(tasks))])
        # no size cap, as in the official warm-up: these triggers only rank pairs and warm-start their inversions
        settings = replace(self.settings(steps), max_mask_fraction=1.0)
        result = invert_triggers(model, tasks, settings, generator, init_masks=init_m, init_patterns=init_p)
        for t in range(len(tasks)):
            ok = bool(result.success[t])
            cache.record(UNIVERSAL, t, result.masks[t] if ok else None, result.patterns[t] if ok else None,
                         float(result.mask_l1[t]))
        cache.warmed_up = True
        h, w = self.data.image_shape[1:]
        cap = self.cfg.flip.max_mask_fraction * h * w
        return [(t, (result.masks[t], result.patterns[t])) for t in range(len(tasks))
                if bool(result.success[t]) and float(result.mask_l1[t]) <= cap]

    def invert_pair(self, model: nn.Module, cache: TriggerCache, x: torch.Tensor, y: torch.Tensor,
                    directions: list[Direction], previous: dict[Direction, Trigger],
                    generator: torch.Generator) -> dict[Direction, Trigger]:
        """Invert the pair's directions on this batch (one batched call); returns the triggers found."""
        f = self.cfg.flip
        init_m, init_p = self.warm_starts([previous.get(d) or cache.get_trigger(*d) for d in directions])
        steps = f.repeat_steps if all(d in previous for d in directions) else f.pair_steps
        tasks = [(x[y == s], t) for s, t in directions]
        result = invert_triggers(model, tasks, self.settings(steps), generator, init_masks=init_m, init_patterns=init_p)
        found = {}
        for k, (s, t) in enumerate(directions):
            ok = bool(result.success[k])
            cache.record(s, t, result.masks[k] if ok else None, result.patterns[k] if ok else None,
                         float(result.mask_l1[k]))
            if ok:
                found[(s, t)] = (result.masks[k], result.patterns[k])
        return found

    def warm_starts(self, starts: list[Trigger | tuple[np.ndarray, np.ndarray] | None]) -> Trigger:
        """Stacked initial masks [N, 1, H, W] and patterns [N, C, H, W]; zeros where a start is None."""
        c, h, w = self.data.image_shape
        init_m = torch.zeros(len(starts), 1, h, w)
        init_p = torch.zeros(len(starts), c, h, w)
        for k, start in enumerate(starts):
            if start is not None:
                init_m[k] = torch.as_tensor(start[0])
                init_p[k] = torch.as_tensor(start[1])
        return init_m, init_p

    # ------------------------------------------------------------------ hardening

    def harden(self, model: nn.Module, cache: TriggerCache, info: RoundInfo, inv_gen: torch.Generator,
               stats: dict[str, float], universal: list[tuple[int, Trigger]]) -> float:
        """The round's batch loop; returns the summed training loss.

        The first batches harden the universal triggers of `universal`, one target per batch (all its
        non-target images eligible); every later batch follows the pair schedule.
        """
        f = self.cfg.flip
        n = self.data.num_classes
        batch_gen = self.generator(info.server_round, STREAM_BATCHES)
        stamp_gen = self.generator(info.server_round, STREAM_STAMP)
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,),
                                                      generator=self.generator(info.server_round, STREAM_PAIRS))))
        optimizer = torch.optim.Adam(model.parameters(), lr=f.lr, betas=(f.betas[0], f.betas[1]))
        batch_size = f.batch_size or self.cfg.client.batch_size
        queue = list(universal)
        pair: Direction | None = None
        previous: dict[Direction, Trigger] = {}
        seen, pair_batches, loss_sum = 0, 0, 0.0
        for _ in range(f.local_epochs):
            for idx in batch_indices(len(self.data), batch_size, batch_gen):
                if f.max_batches is not None and seen >= f.max_batches:
                    return loss_sum
                seen += 1
                x, y = self.data.batch(idx)
                if queue:
                    t, (mask, pattern) = queue.pop(0)
                    found: dict[Direction, Trigger] = {(UNIVERSAL, t): (mask, pattern)}
                    stats["flip_universal_batches"] += 1
                else:
                    counts = torch.bincount(y, minlength=n)
                    present = [c for c in range(n) if counts[c] >= MIN_CLASS_IMAGES]
                    if pair_batches % f.pair_every == 0:
                        pair = cache.select_pair(rng, f.explore, sources=present) if present else None
                        previous = {}
                    pair_batches += 1
                    if pair is None or counts[pair[0]] < MIN_CLASS_IMAGES:
                        stats["flip_batches_skipped"] += 1
                        continue
                    s, t = pair
                    directions = [(s, t)] + ([(t, s)] if f.symmetric and counts[t] >= MIN_CLASS_IMAGES else [])
                    start = time.perf_counter()
                    found = previous = self.invert_pair(model, cache, x, y, directions, previous, inv_gen)
                    stats["invert_seconds"] += time.perf_counter() - start
                    stats["flip_inversions"] += 1
                    stats["flip_directions"] += len(directions)
                    stats["flip_triggers_found"] += len(found)
                start = time.perf_counter()
                if found:
                    keys = list(found)
                    sources = [[c for c in range(n) if c != t] if s == UNIVERSAL else [s] for s, t in keys]
                    x, stamped = harden_batch(x, y, torch.stack([found[k][0] for k in keys]),
                                              torch.stack([found[k][1] for k in keys]), f.portion, stamp_gen,
                                              sources=sources)
                    stats["flip_images_stamped"] += stamped
                loss_sum += self.train_step(model, optimizer, x, y)
                stats["flip_batches_trained"] += 1
                stats["harden_seconds"] += time.perf_counter() - start
        return loss_sum

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor) -> float:
        """One optimiser step on the (stamped) batch with its true labels, model in train mode."""
        model.train()
        x, y = x.to(self.device), y.to(self.device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    # ------------------------------------------------------------------ persistence

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
        """Store the cache in `self.state` (triggers as float16, at most `flip.max_cached_triggers` pairs)."""
        cache.prune(self.cfg.flip.max_cached_triggers)
        arrays = cache.to_arrays()
        for name in ("masks", "patterns"):
            arrays[name] = arrays[name].astype(np.float16)
        for k in cache_arrays(self.state):
            del self.state.arrays[CACHE_PREFIX + k]
        self.state.arrays.update({CACHE_PREFIX + k: v for k, v in arrays.items()})


def cache_arrays(state: ClientState) -> dict[str, np.ndarray]:
    """The FLIP cache's arrays in a client state, without their `CACHE_PREFIX` (empty before a first fit)."""
    return {k[len(CACHE_PREFIX):]: v for k, v in state.arrays.items() if k.startswith(CACHE_PREFIX)}
