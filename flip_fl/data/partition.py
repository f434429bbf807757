"""How the training set is split across clients (IID or Dirichlet label skew), and each client's local data."""

from __future__ import annotations

import functools

import numpy as np

from flip_fl.config import Config, ConfigError
from flip_fl.data.dataset import ImageDataset
from flip_fl.data.sources import DataKey, load_keyed
from flip_fl.seeds import PARTITION_DIRICHLET, PARTITION_IID, numpy_rng


def partition_iid(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and split into `num_clients` near-equal parts."""
    rng = numpy_rng(seed, PARTITION_IID)
    return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), num_clients)]


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Label-skewed split: each class is divided across clients with Dirichlet(alpha) proportions.

    Redrawn (same seed stream) until every client has at least `min_size` samples.
    """
    rng = numpy_rng(seed, PARTITION_DIRICHLET)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(f"data.alpha: {alpha} leaves some of {num_clients} clients without data after "
                      f"{max_tries} draws; raise data.alpha or lower federation.num_clients")


def partition(cfg: Config, train: ImageDataset) -> list[np.ndarray]:
    """Index arrays of every client's training data, as configured."""
    n = cfg.federation.num_clients
    if cfg.data.partition == "dirichlet":
        assert cfg.data.alpha is not None  # guaranteed by config validation
        return partition_dirichlet(train.labels.numpy(), n, cfg.data.alpha, cfg.seed)
    return partition_iid(len(train), n, cfg.seed)


@functools.lru_cache(maxsize=2)
def _partitions(keyed: DataKey, scheme: tuple) -> list[np.ndarray]:
    return partition(keyed.cfg, load_keyed(keyed)[0])


def client_indices(cfg: Config, partition_id: int) -> np.ndarray:
    """Training-set sample ids of one client's partition (cached per process)."""
    scheme = (cfg.data.partition, cfg.data.alpha, cfg.federation.num_clients, cfg.seed)
    return _partitions(DataKey(cfg), scheme)[partition_id]


def client_dataset(cfg: Config, partition_id: int) -> ImageDataset:
    """The local training data of one client (cached per process)."""
    return load_keyed(DataKey(cfg))[0].subset(client_indices(cfg, partition_id))
