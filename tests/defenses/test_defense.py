"""What `strategies/defense.py` does for every rule: the decision's metrics (detection, attacker weight and share),
rounds without attackers, and BatchNorm statistics that follow the decision's weights."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.defense import Decision, attacker_share, detection_fields
from tests.defenses.rounds import (
    BAD,
    HOSTILE,
    N,
    P,
    aggregate,
    hostile_round,
    make_global,
    make_updates,
    strategy,
    trained,
)


def test_rounds_without_attackers_report_false_rejections_only():
    g, ups = make_global(), make_updates()
    extra = aggregate(strategy("krum"), g, ups, attacking=())[2]
    assert extra["detection_recall"] is None and extra["detection_fp"] == N - 1
    assert extra["defense_attacker_weight"] is None


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


@pytest.mark.parametrize("name", ["norm_clip", "fltrust", "multikrum"])
def test_attacker_share_is_measured_after_clipping_and_rescaling(name, offline):
    """The attacker's weight is what the rule gave it; its share is its part of the aggregate update."""
    strat = offline(strategy(name, "defense.norm_clip.clip_norm=1.5") if name == "norm_clip" else strategy(name))
    _, U, extra = aggregate(strat, make_global(), make_updates(outlier=-10.0 if name != "multikrum" else 1.2))
    w = np.asarray(extra["defense_weights"])
    s = np.asarray(extra.get("defense_scales", np.ones(N)))
    contribution = np.abs(w * s) * np.linalg.norm(U[:, P], axis=1)
    assert extra["defense_attacker_share"] == pytest.approx(contribution[BAD] / contribution.sum(), rel=1e-4)
    assert extra["defense_attacker_weight"] == pytest.approx(w[BAD], abs=1e-6)
    if name == "norm_clip":  # the attacker's update is 10x the others': clipping takes most of its share away
        unclipped = np.abs(w) * np.linalg.norm(U[:, P], axis=1)
        assert extra["defense_attacker_share"] < 0.5 * unclipped[BAD] / unclipped.sum()


def test_detection_fields_of_a_decision():
    """Rejection is detection: kept/rejected lists and scores over the aggregated clients, in their order."""
    decision = Decision(weights=np.array([0.5, 0.0, 0.5, 0.0]), kept=np.array([True, False, True, False]),
                        info={"cluster_size": np.int64(2), "ratio": np.float64(np.nan)})
    out = detection_fields([2, 4, 6, 8], [4, 6], decision, norms=np.array([1.0, 5.0, 3.0, 1.0]))
    assert out["defense_clients"] == [2, 4, 6, 8] and out["defense_weights"] == [0.5, 0.0, 0.5, 0.0]
    assert out["defense_kept"] == [2, 6] and out["defense_rejected"] == [4, 8]
    assert (out["detection_tp"], out["detection_fp"], out["detection_fn"], out["detection_tn"]) == (1, 1, 1, 1)
    assert out["defense_attacker_weight"] == 0.5 and out["defense_attacker_share"] == pytest.approx(1.5 / 2.0)
    assert out["defense_cluster_size"] == 2 and type(out["defense_cluster_size"]) is int
    assert out["defense_ratio"] is None  # a non-finite diagnostic is written as null


def test_a_skipped_decision_records_no_detection():
    out = detection_fields([0, 1], [1], Decision(skipped="too few", info={"num_malicious": 1, "skipped": True}))
    assert out == {"defense_clients": [0, 1], "defense_skipped": True, "defense_skip_reason": "too few",
                   "defense_num_malicious": 1}


def test_attacker_share_weighs_scales_and_norms():
    w, s, norms = np.array([0.5, 0.5]), np.array([1.0, 0.1]), np.array([1.0, 10.0])
    assert attacker_share(w, s, norms, np.array([False, True])) == pytest.approx(0.5)
    assert attacker_share(w, None, norms, np.array([False, True])) == pytest.approx(10 / 11)
    assert attacker_share(w, s, norms, np.array([False, False])) is None
    assert attacker_share(np.zeros(2), s, norms, np.array([False, True])) == 0.0
