"""Server update rule against a numpy reference, through the same Flower aggregation the strategy uses."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from flip_fl.defenses.updates import apply_server_lr
from tests.reference_rules import weighted_mean

rng = np.random.default_rng(0)
GLOBAL = {"w": rng.normal(size=(3, 2)).astype(np.float32), "bn.num_batches_tracked": np.array(10, dtype=np.int64)}
CLIENTS = [{"w": GLOBAL["w"] + rng.normal(size=(3, 2)).astype(np.float32),
            "bn.num_batches_tracked": np.array(10 + 5 * (i + 1), dtype=np.int64)} for i in range(3)]
EXAMPLES = [10, 30, 60]


def flower_aggregate(key: str) -> dict[str, np.ndarray]:
    records = [RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in c.items()}),
                           "weights": MetricRecord({"num-examples": n, "unit-weight": 1})})
               for c, n in zip(CLIENTS, EXAMPLES)]
    return {k: v.numpy() for k, v in aggregate_arrayrecords(records, key).items()}


@pytest.mark.parametrize("key, weights", [("num-examples", EXAMPLES), ("unit-weight", [1, 1, 1])])
@pytest.mark.parametrize("eta", [1.0, 0.1])
def test_server_rule_matches_numpy(key, weights, eta):
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    deltas = [c["w"].astype(np.float64) - GLOBAL["w"] for c in CLIENTS]
    expected = GLOBAL["w"] + eta * sum(wi * d for wi, d in zip(w, deltas))
    new = apply_server_lr(GLOBAL, flower_aggregate(key), eta)
    np.testing.assert_allclose(new["w"], expected, rtol=1e-5, atol=1e-6)
    assert new["w"].dtype == np.float32
    assert new["bn.num_batches_tracked"].dtype == np.int64
    steps = 10 + eta * sum(wi * 5 * (i + 1) for i, wi in enumerate(w))
    assert new["bn.num_batches_tracked"] == np.rint(steps)


def test_weighted_mean_reference():
    out = weighted_mean(CLIENTS, EXAMPLES)
    np.testing.assert_allclose(out["w"], sum(n * c["w"].astype(np.float64) for c, n in zip(CLIENTS, EXAMPLES)) / 100)
    with pytest.raises(ValueError):
        weighted_mean([], [])


def test_eta_one_with_plain_mean_is_classic_average():
    new = apply_server_lr(GLOBAL, flower_aggregate("unit-weight"), 1.0)
    np.testing.assert_allclose(new["w"], np.mean([c["w"] for c in CLIENTS], axis=0), rtol=1e-6)


def test_state_conversions_keep_zero_dimensional_entries():
    """BatchNorm's num_batches_tracked and cached scalars are 0-d: they must survive the records."""
    import torch
    from flwr.app import RecordDict

    from flip_fl.federation.client import ClientState
    from flip_fl.federation.protocol import read_state, write_state
    from flip_fl.models import create_model
    from strategies.seeded_fedavg import arrays_to_numpy, numpy_to_arrays

    model = create_model("resnet32", 10, 3, 32)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    back = arrays_to_numpy(numpy_to_arrays(state))
    assert all(back[k].shape == v.shape and back[k].dtype == v.dtype for k, v in state.items())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})

    content = RecordDict()
    write_state(content, ClientState(arrays={"flag": np.asarray(True), "sizes": np.ones((2, 2))}, values={"n": 3}))
    restored = read_state(content)
    assert restored.arrays["flag"].shape == () and bool(restored.arrays["flag"]) is True
    assert restored.arrays["sizes"].shape == (2, 2) and restored.values == {"n": 3}
