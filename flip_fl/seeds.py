"""Every random stream of a run, named in one place.

A run is a pure function of `seed`: each consumer draws from its own stream, derived from the seed and a
fixed stream id, so adding draws in one place never shifts another. The ids are arbitrary constants;
changing one changes every result that depends on it. Streams keyed by numbers other than these ids:
the round sample (`numpy_rng(seed, round)`), the initial global model (`torch.manual_seed(seed)`) and
an attacker's own FLIP labels (`torch.Generator().manual_seed(seed)`).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

ATTACKERS = 0xA77AC
"""Which partitions are malicious: `numpy_rng(seed, ATTACKERS)`."""
PARTITION_IID = 0x11D
"""IID split of the training set."""
PARTITION_DIRICHLET = 0xD1C
"""Dirichlet split of the training set."""
FLTRUST_ROOT = 0xF17
"""FLTrust's root dataset, drawn from the test set."""
FLTRUST_TRAINING = 0xF1
"""The server's own training on FLTrust's root data, per round: `torch_generator(seed, round, FLTRUST_TRAINING)`."""
DIGITS_SPLIT = 0xD161
"""The stratified train/test split of the `digits` dataset."""
DEFENSE_NOISE = 0xDEF
"""Noise that defenses add to the aggregate (weak DP, FLAME), per round."""


class ClientStream(IntEnum):
    """A client's streams in a round: `torch_generator(seed, round, partition, stream)`."""

    BATCHES = 0
    """Minibatch order of local training (every client class)."""
    INVERT = 1
    """FLIP defense: trigger inversion (initialisation, minibatches, restarts)."""
    STAMP = 2
    """FLIP defense: which images of a batch get an inverted trigger."""
    PAIRS = 3
    """FLIP defense: the (source, target) pair schedule."""


def synthetic_data_seed(seed: int) -> int:
    """Seed of the torch generator that draws the synthetic dataset."""
    return seed * 7919 + 17


def label_stage_seed(seed: int, stage_index: int) -> int:
    """Seed of the torch generator of stage `stage_index` of the FLIP label-attack pipeline."""
    return seed * 1000 + stage_index


def numpy_rng(*entropy: int) -> np.random.Generator:
    """A numpy generator seeded by a sequence of integers (the seed first, then stream ids)."""
    return np.random.default_rng(list(entropy))


def torch_generator(*entropy: int) -> torch.Generator:
    """A CPU torch generator seeded from a numpy SeedSequence of the integers (the seed first, then stream ids)."""
    seed = np.random.SeedSequence(list(entropy)).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))
