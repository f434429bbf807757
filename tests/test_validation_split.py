"""The validation split for choosing tau (server.validation_size)."""

import numpy as np
import pytest
import torch

from flip_fl.config import ConfigError
from flip_fl.data import load_datasets
from flip_fl.evaluation.evaluator import validation_split
from tests.tiny import tiny_config


def test_validation_split_is_seeded_disjoint_and_complete():
    cfg = tiny_config("server.validation_size=100")
    _, test = load_datasets(cfg)
    validation, rest = validation_split(cfg, test)
    assert validation is not None and len(validation) == 100 and len(rest) == len(test) - 100
    joined = torch.cat([validation.images, rest.images]).flatten(1)
    assert len(np.unique(joined.numpy(), axis=0)) == len(test)  # every test image once, in one part only
    again, _ = validation_split(cfg, test)
    assert torch.equal(again.images, validation.images)
    other, _ = validation_split(tiny_config("server.validation_size=100", "seed=1"), test)
    assert not torch.equal(other.images, validation.images)
    none, same = validation_split(tiny_config(), test)
    assert none is None and same is test
    with pytest.raises(ConfigError, match="server.validation_size: 300 validation images cannot be held out of 300"):
        validation_split(tiny_config("server.validation_size=300"), test)
