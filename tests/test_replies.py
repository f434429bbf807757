"""Hostile replies: whatever a client sends, the server counts it as a failed client or aggregates it.

The strategies run their real `aggregate_train` on Flower Messages built here (no Ray), with the model of
`tests/test_defenses.py` (convolution, BatchNorm with running statistics and a batch counter, linear
layer). One real Flower + Ray run with a hostile client class is in `tests/test_e2e_core.py`.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flip_fl.federation import protocol
from flip_fl.federation.rounds import RoundRecord
from strategies import DEFENSES, RoundFailedError
from strategies.seeded_fedavg import arrays_to_numpy, required_replies
from tests.test_defenses import BAD, EXAMPLES, N, make_global, make_updates, reply, strategy

HOSTILE = 5  # a benign partition whose reply is broken (BAD = 3 attacks as usual)


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


def trained(g: dict[str, np.ndarray], update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (g[k] + update[k]).astype(g[k].dtype) for k in g}


def hostile_round(strat, fault, server_round: int = 1, global_state=None, examples=EXAMPLES):
    """One round in which partition HOSTILE sends `fault` applied to its trained state; (new global, record)."""
    g = make_global() if global_state is None else global_state
    strat.global_state = g
    strat.rounds[server_round] = RoundRecord(sampled=list(range(N)), malicious=[BAD], attacking=[BAD], started=0.0)
    states = [trained(g, u) for u in make_updates()]
    fault(states[HOSTILE])
    order = np.random.default_rng(server_round).permutation(N)
    new, _ = strat.aggregate_train(server_round, [reply(100 + int(i), states[i], examples[i]) for i in order])
    return arrays_to_numpy(new), strat.rounds[server_round]


FAULTS = {
    "NaN": (lambda s: _set(s, "fc.weight", 3, np.nan), "'fc.weight' has 1 non-finite value"),
    "inf": (lambda s: _set(s, "conv.weight", 0, np.inf), "'conv.weight' has 1 non-finite value"),
    "missing tensor": (lambda s: _drop(s, "conv.weight"), "model entry 'conv.weight' is missing"),
    "NaN BatchNorm statistics": (lambda s: s["bn.running_mean"].fill(np.nan), "'bn.running_mean' has 2 non-finite"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("name", sorted(DEFENSES.names))
def test_a_hostile_client_is_a_counted_failure_under_every_defense(name, fault, monkeypatch):
    """Done when: NaN, inf, a missing tensor or NaN BatchNorm statistics from one client, under each of the
    13 defenses: the rounds complete, the client is failed with its reason, the global model stays finite."""
    strat = strategy(name)
    if name == "fltrust":
        monkeypatch.setattr(strat, "server_update", lambda server_round: np.ones(int(strat.parameter_mask().sum())))
    change, reason = FAULTS[fault]
    g = make_global()
    for server_round in (1, 2):
        g, record = hostile_round(strat, change, server_round, g)
        assert record.failed == [HOSTILE] and record.failures == 1
        assert len(record.errors) == 1 and record.errors[0].startswith(f"client {HOSTILE}: ")
        assert reason in record.errors[0]
        assert all(np.isfinite(v).all() for v in g.values()), name
        assert HOSTILE not in record.extra.get("defense_clients", []) and HOSTILE not in record.client_metrics
    if name == "bulyan":  # 6 valid replies < 4f + 3 = 7: no decision, the round keeps the global model
        assert record.extra["defense_skipped"] is True and "detection_tp" not in record.extra


def test_rejected_clients_batchnorm_statistics_never_reach_the_model():
    """Krum keeps one client: the statistics are exactly that client's, whatever the others hold."""
    g = make_global()

    def loud(state):
        state["bn.running_mean"] += 1e30  # finite, absurd, and from a client that is not selected

    new, record = hostile_round(strategy("krum"), loud)
    kept = record.extra["defense_kept"]
    assert HOSTILE not in kept and len(kept) == 1
    chosen = trained(g, make_updates()[kept[0]])
    np.testing.assert_allclose(new["bn.running_mean"], chosen["bn.running_mean"], rtol=1e-6)


@pytest.mark.parametrize("min_clients, failing, fails", [
    (0.5, 3, False), (0.5, 4, True), (7, 1, True), (1, 6, False), (1.0, 1, True),
])
def test_min_clients_fails_a_round_instead_of_aggregating_what_is_left(min_clients, failing, fails):
    strat = strategy("fedavg", f"server.min_clients={min_clients}")
    broken_ids = [i for i in range(N) if i != BAD][:failing]

    def run_round():
        strat.global_state = make_global()
        strat.rounds[1] = RoundRecord(sampled=list(range(N)), malicious=[BAD], attacking=[BAD], started=0.0)
        states = [trained(make_global(), u) for u in make_updates()]
        for i in broken_ids:
            states[i]["fc.bias"][0] = np.nan
        return strat.aggregate_train(1, [reply(100 + i, states[i], EXAMPLES[i]) for i in range(N)])

    if fails:
        with pytest.raises(RoundFailedError, match=r"round 1: (only \d+ of 7 sampled clients sent a valid reply|all 7)"
                                                   r".*client \d: model entry 'fc.bias'") as info:
            run_round()
        assert "\n" not in str(info.value)
    else:
        assert run_round()[0] is not None and strat.rounds[1].failures == failing


def test_required_replies():
    assert [required_replies(0.5, n) for n in (1, 2, 7, 10)] == [1, 1, 4, 5]
    assert required_replies(1.0, 7) == 7 and required_replies(3, 7) == 3 and required_replies(9, 7) == 7


def test_missing_and_duplicate_replies():
    """A sampled client that never answers fails with the timeout reason; a second reply from a node is ignored."""
    strat = strategy("fedavg")
    strat.global_state = g = make_global()
    strat.rounds[1] = RoundRecord(sampled=list(range(N)), malicious=[], attacking=[], started=0.0)
    states = [trained(g, u) for u in make_updates()]
    replies = [reply(100 + i, states[i], 10) for i in range(N - 1)] + [reply(100, states[0], 10)]
    strat.aggregate_train(1, replies)
    record = strat.rounds[1]
    assert record.failed == [N - 1] and "no reply within resources.round_timeout" in record.errors[0]
    assert sorted(record.client_metrics) == list(range(N - 1))


def test_a_round_krum_cannot_decide_is_skipped_not_scored():
    """Failures leave 4 valid replies for f = 1 (Krum needs 5): the global model is kept, and no client
    counts as rejected in the detection metrics."""
    strat = strategy("krum", "server.min_clients=1")
    g = make_global()
    strat.global_state = g
    strat.rounds[1] = RoundRecord(sampled=list(range(N)), malicious=[BAD], attacking=[BAD], started=0.0)
    states = [trained(g, u) for u in make_updates()]
    for i in (0, 1, 2):
        states[i]["fc.weight"][0, 0] = np.inf
    new, _ = strat.aggregate_train(1, [reply(100 + i, states[i], EXAMPLES[i]) for i in range(N)])
    extra = strat.rounds[1].extra
    assert extra["defense_skipped"] is True and "krum with f = 1 needs 2f + 3 = 5" in extra["defense_skip_reason"]
    assert not any(k.startswith("detection_") for k in extra) and "defense_rejected" not in extra
    for k, v in arrays_to_numpy(new).items():
        np.testing.assert_array_equal(v, g[k])


@pytest.mark.parametrize("name", ["norm_clip", "fltrust", "multikrum"])
def test_attacker_share_is_measured_after_clipping_and_rescaling(name, monkeypatch):
    """The attacker's weight is what the rule gave it; its share is its part of the aggregate update."""
    from tests.test_defenses import P, aggregate

    strat = strategy(name, "defense.clip_norm=1.5") if name == "norm_clip" else strategy(name)
    if name == "fltrust":
        monkeypatch.setattr(strat, "server_update", lambda server_round: np.ones(int(P.sum())))
    _, U, extra = aggregate(strat, make_global(), make_updates(outlier=-10.0 if name != "multikrum" else 1.2))
    w = np.asarray(extra["defense_weights"])
    s = np.asarray(extra.get("defense_scales", np.ones(N)))
    contribution = np.abs(w * s) * np.linalg.norm(U[:, P], axis=1)
    assert extra["defense_attacker_share"] == pytest.approx(contribution[BAD] / contribution.sum(), rel=1e-4)
    assert extra["defense_attacker_weight"] == pytest.approx(w[BAD], abs=1e-6)
    if name == "norm_clip":  # the attacker's update is 10x the others': clipping takes most of its share away
        unclipped = np.abs(w) * np.linalg.norm(U[:, P], axis=1)
        assert extra["defense_attacker_share"] < 0.5 * unclipped[BAD] / unclipped.sum()
