"""`flip_fl.defenses.updates`: model states as flat float64 vectors and back, and the BatchNorm-statistics mask."""

from __future__ import annotations

import numpy as np
import pytest

from flip_fl.defenses.updates import bn_statistic_mask, flatten_state, unflatten


def test_flatten_unflatten_roundtrip_and_bn_mask():
    template = {
        "conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bn.weight": np.ones(2, dtype=np.float32),
        "bn.running_mean": np.zeros(2, dtype=np.float32),
        "bn.running_var": np.ones(2, dtype=np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }
    other = {k: v + 1 for k, v in template.items()}
    M = flatten_state([template, other])
    assert M.shape == (2, 13) and M.dtype == np.float64
    back = unflatten(M[1], template)
    for k in template:
        assert back[k].dtype == template[k].dtype and back[k].shape == template[k].shape
        np.testing.assert_array_equal(back[k], other[k])
    mask = bn_statistic_mask(template)
    assert mask.tolist() == [False] * 8 + [True] * 5
    keys = ["bn.weight", "conv.weight"]
    assert flatten_state([template], keys).shape == (1, 8)
    with pytest.raises(ValueError):
        unflatten(np.zeros(5), template)
