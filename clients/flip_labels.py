"""Label-only FL poisoner: clean local images, FLIP labels (Jha et al., NeurIPS 2023)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clients.benign import BenignClient
from flip_fl.attacks.flip_labels.stages import local_flip_labels
from flip_fl.config import Config
from flip_fl.config.schema import ConfigError
from flip_fl.data import ImageDataset, client_indices, load_datasets
from flip_fl.federation.client import FitResult, RoundInfo, StateDict


class FlipLabelClient(BenignClient):
    """Trains exactly like a benign client, but on its own clean images under FLIP-optimised labels.

    Labels come from `flip_labels.label_file` (a pipeline run's `flips/labels_<budget>.npy` over the whole
    training set, sliced to this partition by sample id), or, when that is null, from the attacker's
    own pipeline on its local data (experts on local data plus triggered copies, trajectory matching,
    `flip_labels.client_budget` flips), computed the first time it attacks and cached under its work dir.
    It never alters images and never scales its update (label-only threat model).
    """

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """A label file must exist and cover the whole training set."""
        if cfg.flip_labels.label_file is None:
            return
        path = Path(cfg.flip_labels.label_file)
        if not path.is_file():
            raise ConfigError(f"flip_labels.label_file: file not found: {path}")
        try:
            labels = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ConfigError(f"flip_labels.label_file: {path} is not a .npy label array ({err})") from None
        train, _ = load_datasets(cfg)
        if labels.shape != (len(train),) or not np.issubdtype(labels.dtype, np.integer):
            raise ConfigError(f"flip_labels.label_file: {path} holds {labels.dtype} {labels.shape}, expected "
                              f"{len(train)} integer labels (one per training sample of {cfg.data.name})")

    def flip_labels(self) -> np.ndarray:
        """This partition's poisoned labels, in local sample order."""
        if self.cfg.flip_labels.label_file is not None:
            return np.load(self.cfg.flip_labels.label_file)[client_indices(self.cfg, self.partition_id)]
        cache = self.workdir / "flip_labels.npy"
        if not cache.is_file():
            labels = local_flip_labels(self.cfg, self.data, self.workdir / "flip_pipeline", self.device)
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, labels)
        return np.load(cache)

    def fit(self, global_state: StateDict, info: RoundInfo) -> FitResult:
        """In attack rounds, train on the local images under the FLIP labels; otherwise like a benign client."""
        if not info.attacking:
            return super().fit(global_state, info)
        labels = torch.from_numpy(self.flip_labels().astype(np.int64))
        flipped = int((labels != self.data.labels).sum())
        self.data = ImageDataset(self.data.images, labels, self.data.num_classes, self.data.mean, self.data.std)
        result = super().fit(global_state, info)
        result.metrics.update({"attacked": 1.0, "flipped_labels": float(flipped)})
        return result
