"""`strategies/server_images.py`: the test images FLTrust and FLARE keep for the server, held out of evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from flip_fl.config import ConfigError, defense_params
from flip_fl.data import load_datasets
from flip_fl.defenses.fltrust import root_split
from strategies import DEFENSES, evaluation_set
from strategies.server_images import ServerImages
from tests.tiny import tiny_config

USERS = [name for name in DEFENSES.names if issubclass(DEFENSES[name], ServerImages)]


def test_the_defenses_with_server_images_are_fltrust_and_flare():
    assert USERS == ["flare", "fltrust"]


@pytest.mark.parametrize("name", USERS)
def test_the_server_keeps_a_seeded_draw_that_evaluation_never_sees(name):
    cfg = tiny_config(f"defense.name={name}", f"defense.{name}.root_size=40")
    test = load_datasets(cfg)[1]
    cls, params = DEFENSES[name], defense_params(cfg)
    held = cls.held_out(params, cfg, len(test))
    np.testing.assert_array_equal(held, root_split(cfg.seed, 40, len(test))[0])
    assert len(cls.server_images(params, cfg)) == 40
    evaluated = evaluation_set(cfg, test)
    assert len(evaluated) == len(test) - 40
    kept = {tuple(x.flatten().tolist()[:8]) + (int(y),) for x, y in zip(evaluated.images, evaluated.labels)}
    assert not any(tuple(test.images[i].flatten().tolist()[:8]) + (int(test.labels[i]),) in kept for i in held[:5])


@pytest.mark.parametrize("name", USERS)
def test_too_many_server_images_name_the_defense_key(name):
    with pytest.raises(ConfigError, match=rf"^defense\.{name}\.root_size: 300 server images cannot be held out"):
        tiny_config(f"defense.name={name}", f"defense.{name}.root_size=300")
    cfg = tiny_config(f"defense.name={name}", f"defense.{name}.root_size=40")
    with pytest.raises(ConfigError, match=rf"^defense\.{name}\.root_size: 40 root images cannot be held out"):
        DEFENSES[name].held_out(defense_params(cfg), cfg, 40)
