"""Test images a defense keeps for the server (FLTrust's root data, FLARE's probe images), held out of evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np

from flip_fl.config import Config, ConfigError
from flip_fl.data import ImageDataset, load_datasets
from flip_fl.defenses.fltrust import root_split


class ServerImages:
    """Mix-in of a defense whose `Params.root_size` seeded test images are the server's own data.

    The draw is `flip_fl.defenses.fltrust.root_split` (the run's seed); those images are excluded from every
    evaluation of the run (`held_out`).
    """

    name: str

    @classmethod
    def check(cls, params: Any, cfg: Config) -> None:
        """The server's images must leave test images to evaluate on."""
        syn = cfg.data.synthetic
        if cfg.data.name == "synthetic" and params.root_size >= syn.test_size:
            raise ConfigError(f"defense.{cls.name}.root_size: {params.root_size} server images cannot be held out of "
                              f"data.synthetic.test_size = {syn.test_size}")

    @classmethod
    def held_out(cls, params: Any, cfg: Config, test_size: int) -> np.ndarray:
        """The test images the server keeps (excluded from evaluation)."""
        try:
            return root_split(cfg.seed, params.root_size, test_size)[0]
        except ValueError as err:
            raise ConfigError(f"defense.{cls.name}.root_size: {err}") from None

    @classmethod
    def server_images(cls, params: Any, cfg: Config) -> ImageDataset:
        """The server's images of a run."""
        test = load_datasets(cfg)[1]
        return test.subset(cls.held_out(params, cfg, len(test)))
