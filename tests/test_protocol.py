"""`flip_fl.federation.protocol.check_fit_reply`: whatever a client sends, a malformed reply has one reason.

The model is that of `tests/defenses/rounds.py` (convolution, BatchNorm with running statistics and a batch
counter, linear layer). The strategies count such replies as failed clients under every defense
(`tests/defenses/test_every_defense.py`, `tests/defenses/test_seeded_fedavg.py`); one real Flower + Ray run
with a hostile client class is in `tests/test_e2e_core.py`.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flip_fl.federation import protocol
from tests.defenses.rounds import make_global


def content(state: dict[str, np.ndarray], examples=10, unit=1, metrics=None) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()}),
                       "weights": MetricRecord({"num-examples": examples, "unit-weight": unit}),
                       "client-metrics": ConfigRecord(metrics if metrics is not None else {"train_loss": 0.5})})


def broken(change) -> RecordDict:
    state = {k: v.copy() for k, v in make_global().items()}
    return change(state) or content(state)


def _set(state, key, index, value):
    state[key].flat[index] = value


def _drop(state, key):
    del state[key]


GARBAGE = {
    "NaN weight": (lambda s: _set(s, "fc.weight", 0, np.nan), "model entry 'fc.weight' has 1 non-finite value"),
    "inf weight": (lambda s: _set(s, "conv.weight", 2, -np.inf), "model entry 'conv.weight' has 1 non-finite"),
    "NaN BatchNorm statistic": (lambda s: _set(s, "bn.running_var", 1, np.nan), "'bn.running_var' has 1 non-finite"),
    "missing entry": (lambda s: _drop(s, "fc.bias"), "model entry 'fc.bias' is missing"),
    "extra entry": (lambda s: s.update(extra=np.ones(2, np.float32)), "unexpected entry 'extra'"),
    "wrong shape": (lambda s: s.update({"fc.weight": np.ones((3, 2), np.float32)}), "is float32 (3, 2), expected"),
    "wrong dtype": (lambda s: s.update({"fc.bias": s["fc.bias"].astype(np.float64)}), "float64 (2,), expected float32"),
    "counter as float": (lambda s: s.update({"bn.num_batches_tracked": np.array(5.0)}), "float64 (), expected int64"),
    "no weights record": (lambda s: RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in s.items()}),
                                                "client-metrics": ConfigRecord({})}), "no MetricRecord 'weights'"),
    "no metrics record": (lambda s: RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in s.items()}),
                                                "weights": MetricRecord({"num-examples": 1, "unit-weight": 1})}),
                          "no ConfigRecord 'client-metrics'"),
    "extra record": (lambda s: RecordDict({**content(s), "more": MetricRecord({"x": 1})}), "unexpected record 'more'"),
    "weights as config": (lambda s: RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in s.items()}),
                                                "weights": ConfigRecord({"num-examples": 1}),
                                                "client-metrics": ConfigRecord({})}), "(it is a ConfigRecord)"),
    "zero examples": (lambda s: content(s, examples=0), "num-examples = 0 is not a positive finite number"),
    "negative examples": (lambda s: content(s, examples=-5), "num-examples = -5"),
    "NaN examples": (lambda s: content(s, examples=float("nan")), "num-examples = nan"),
    "unit weight inflated": (lambda s: content(s, unit=1000), "unit-weight = 1000 is not 1"),
    "weights missing a key": (lambda s: RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in s.items()}),
                                                    "weights": MetricRecord({"num-examples": 3}),
                                                    "client-metrics": ConfigRecord({})}), "must hold exactly"),
    "text metric": (lambda s: content(s, metrics={"train_loss": "low"}), "client metric 'train_loss' = 'low'"),
    "NaN metric": (lambda s: content(s, metrics={"train_loss": float("nan")}), "is not a finite number"),
    "undecodable bytes": (lambda s: RecordDict({**content(s), "arrays": ArrayRecord(
        {**{k: Array(v) for k, v in s.items()},
         "fc.bias": Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"\x93NUMPY garbage")})}),
                          "'fc.bias' cannot be decoded"),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_every_malformed_reply_has_one_reason(name):
    change, reason = GARBAGE[name]
    found = protocol.check_fit_reply(broken(change), make_global())
    assert found is not None and reason in found and "\n" not in found, found


def test_a_well_formed_reply_passes():
    assert protocol.check_fit_reply(content(make_global()), make_global()) is None
