"""DnC (`strategies/dnc.py`, `flip_fl.defenses.dnc.dnc`): the paper's algorithm on a 3-client example by hand
and against a loop reference, the intersection over iterations, seeded coordinates, and the strategy's f, c and
skipped rounds."""

from __future__ import annotations

import numpy as np
import pytest

from flip_fl.config import ConfigError
from flip_fl.defenses.dnc import dnc, outlier_scores, removed_count
from strategies.dnc import DnCDefense
from tests.defenses.references import planted
from tests.defenses.rounds import (
    BAD,
    EXAMPLES,
    NODE,
    N,
    P,
    aggregate,
    assert_update,
    make_global,
    make_updates,
    reply,
    start_round,
    strategy,
    trained,
    with_statistics,
)
from tests.tiny import tiny_config

# --------------------------------------------------------------------------- numpy rule


def ref_power_scores(S, steps=2000):
    """Squared projections of the centred rows on the top right singular vector, by power iteration on C^T C."""
    C = S - S.mean(axis=0)
    v = np.ones(C.shape[1]) / np.sqrt(C.shape[1])
    for _ in range(steps):
        v = C.T @ (C @ v)
        v /= np.linalg.norm(v)
    return (C @ v) ** 2


def test_three_clients_by_hand():
    """Rows (0,0), (2,0), (10,0): mean (4,0), centred (-4,0), (-2,0), (6,0); v = (1,0); scores 16, 4, 36;
    f = 1, c = 1 removes client 3; the aggregate is the mean of (0,0) and (2,0)."""
    U = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0]])
    np.testing.assert_allclose(outlier_scores(U), [16.0, 4.0, 36.0])
    out = dnc(U, num_remove=1, sub_dim=2, iterations=1, rng=np.random.default_rng(0))
    assert out.kept.tolist() == [True, True, False]
    np.testing.assert_allclose(out.delta, [1.0, 0.0])
    np.testing.assert_allclose(out.weights, [0.5, 0.5, 0.0])


def test_three_clients_off_axis_by_hand():
    """Rows (1,1), (-1,-1), (0,3): mean (0,1), centred (1,0), (-1,-2), (0,2); C^T C = [[2,2],[2,8]] has top
    eigenvector (1, (3 + sqrt 13) / 2) normalised; the largest score is client 2's."""
    U = np.array([[1.0, 1.0], [-1.0, -1.0], [0.0, 3.0]])
    v = np.array([1.0, (3 + np.sqrt(13)) / 2])
    v /= np.linalg.norm(v)
    C = U - U.mean(axis=0)
    expected = (C @ v) ** 2
    np.testing.assert_allclose(outlier_scores(U), expected)
    assert int(np.argmax(expected)) == 1
    out = dnc(U, 1, 2, 1, np.random.default_rng(0))
    assert out.kept.tolist() == [True, False, True]
    np.testing.assert_allclose(out.delta, (U[0] + U[2]) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_power_iteration_and_an_svd(seed):
    S = np.random.default_rng(seed).normal(size=(7, 12))
    S[seed] += 4.0
    np.testing.assert_allclose(outlier_scores(S), ref_power_scores(S), rtol=1e-8, atol=1e-10)
    C = S - S.mean(axis=0)
    v = np.linalg.svd(C)[2][0]
    np.testing.assert_allclose(outlier_scores(S), (C @ v) ** 2, rtol=1e-9, atol=1e-12)
    wide = np.random.default_rng(seed).normal(size=(5, 300)) * 1e3
    Cw = wide - wide.mean(axis=0)
    np.testing.assert_allclose(outlier_scores(wide), (Cw @ np.linalg.svd(Cw)[2][0]) ** 2, rtol=1e-9)


def test_a_planted_outlier_is_removed_and_the_clean_mean_kept():
    U, honest_mean = planted(n_honest=9, d=300, seed=4)
    out = dnc(U, num_remove=1, sub_dim=50, iterations=5, rng=np.random.default_rng(0))
    assert out.kept.tolist() == [True] * 9 + [False]
    np.testing.assert_allclose(out.delta, honest_mean)
    assert out.info["sub_dim"] == 50 and out.arrays["coordinates"].shape == (5, 50)


def test_clean_updates_pass_when_no_attacker_is_assumed():
    U = np.random.default_rng(3).normal(size=(6, 20))
    out = dnc(U, num_remove=0, sub_dim=5, iterations=3, rng=np.random.default_rng(0))
    assert out.kept.all()
    np.testing.assert_allclose(out.delta, U.mean(axis=0))


def test_the_good_set_is_the_intersection_of_every_iterations_kept_set():
    """Each iteration's kept set, recomputed from its recorded coordinates; the good set is their intersection."""
    rng = np.random.default_rng(5)
    U = rng.normal(size=(8, 40))
    U[2, :20] += 6.0  # an outlier in the first half of the coordinates only
    U[5, 20:] += 6.0  # another in the second half
    out = dnc(U, num_remove=2, sub_dim=10, iterations=4, rng=np.random.default_rng(1))
    expected = np.ones(8, dtype=bool)
    for idx in out.arrays["coordinates"]:
        scores = outlier_scores(U[:, idx])
        kept = np.zeros(8, dtype=bool)
        kept[np.argsort(scores, kind="stable")[:6]] = True
        expected &= kept
    np.testing.assert_array_equal(out.kept, expected)
    assert not out.kept[2] and not out.kept[5]


def test_coordinates_are_drawn_from_the_generator_and_capped_at_d():
    U = np.random.default_rng(0).normal(size=(5, 30))
    a, b = (dnc(U, 1, 8, 3, np.random.default_rng(7)) for _ in range(2))
    np.testing.assert_array_equal(a.arrays["coordinates"], b.arrays["coordinates"])
    assert all(len(set(row)) == 8 for row in a.arrays["coordinates"])
    other = dnc(U, 1, 8, 3, np.random.default_rng(8))
    assert not np.array_equal(a.arrays["coordinates"], other.arrays["coordinates"])
    full = dnc(U, 1, 10**6, 2, np.random.default_rng(7))
    assert full.info["sub_dim"] == 30 and all(sorted(row) == list(range(30)) for row in full.arrays["coordinates"])


def test_removed_count_rounds_c_f_up():
    assert [removed_count(c, f) for c, f in [(1.0, 3), (0.5, 3), (1.5, 2), (1.0, 0), (0.3, 10)]] == [3, 2, 3, 0, 3]


def test_bad_arguments_are_value_errors():
    U = np.ones((3, 2))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="num_remove"):
        dnc(U, 3, 2, 1, rng)
    with pytest.raises(ValueError, match="sub_dim"):
        dnc(U, 1, 0, 1, rng)
    with pytest.raises(ValueError, match="iterations"):
        dnc(U, 1, 2, 0, rng)


# --------------------------------------------------------------------------- strategy


def test_the_strategy_removes_the_attacker_and_averages_the_rest():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("dnc"), g, ups)
    kept = np.isin(np.arange(N), extra["defense_kept"])
    assert extra["defense_rejected"] == [BAD] and extra["detection_recall"] == 1.0
    assert extra["defense_num_malicious"] == 1 and extra["defense_num_removed"] == 1 and not extra["defense_skipped"]
    assert_update(new, g, with_statistics(U, U[kept][:, P].mean(axis=0), kept / kept.sum()))


def test_f_comes_from_the_attack_schedule_and_c_scales_it():
    two, more, none = (strategy("dnc", bad=(1, 3)), strategy("dnc", "defense.dnc.filter_frac=1.5", bad=(1, 3)),
                       strategy("dnc", "defense.dnc.num_malicious=0"))
    assert isinstance(two, DnCDefense) and isinstance(more, DnCDefense) and isinstance(none, DnCDefense)
    assert two.num_malicious == 2 and two.num_remove == 2
    assert more.num_remove == 3 and none.num_remove == 0


def test_the_coordinates_depend_on_seed_and_round():
    g = make_global()
    ups = [{k: np.random.default_rng(i).normal(size=np.shape(v)) for k, v in u.items()} for i, u in
           enumerate(make_updates())]
    for u in ups:
        u["bn.num_batches_tracked"] = np.array(5)

    def kept(seed, server_round):
        return aggregate(strategy("dnc", f"seed={seed}", "defense.dnc.sub_dim=3", "defense.dnc.iterations=1"), g,
                         ups, server_round=server_round)[2]["defense_kept"]

    assert kept(0, 1) == kept(0, 1)
    assert len({tuple(kept(s, r)) for s in (0, 1, 2) for r in (1, 2, 3)}) > 1


def test_a_round_with_too_few_replies_is_skipped():
    """f = 2, c = 1.5: ceil(c f) = 3 removed; failures leave 3 valid replies, so nothing would be left."""
    strat = strategy("dnc", "server.min_clients=1", "defense.dnc.filter_frac=1.5", bad=(1, 3))
    g = make_global()
    start_round(strat, g)
    states = [trained(g, u) for u in make_updates()]
    for i in (0, 2, 4, 6):
        states[i]["fc.weight"][0, 0] = np.nan
    new, _ = strat.aggregate_train(1, [reply(NODE + i, states[i], EXAMPLES[i]) for i in range(len(states))])
    extra = strat.rounds[1].extra
    assert extra["defense_skipped"] is True and "removes ceil(c f) = 3" in str(extra["defense_skip_reason"])
    assert not any(k.startswith("detection_") for k in extra)
    assert new is not None and all(np.array_equal(v.numpy(), g[k]) for k, v in new.items())


@pytest.mark.parametrize("overrides, message", [
    (("defense.dnc.num_malicious=7",), "defense.dnc.num_malicious: f = 7 must be below"),
    (("defense.dnc.num_malicious=3", "defense.dnc.filter_frac=2.5"),
     r"defense.dnc.filter_frac: c = 2.5 removes ceil\(c \* f\) = 8 clients for f = 3"),
    (("defense.dnc.filter_frac=0",), "defense.dnc.filter_frac: 0.0 is out of range"),
    (("defense.dnc.sub_dim=0",), "defense.dnc.sub_dim: 0 is out of range"),
    (("defense.dnc.iterations=0",), "defense.dnc.iterations: 0 is out of range"),
])
def test_bad_parameters_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("federation.num_clients=8", "federation.clients_per_round=7", "attack.num_malicious=1",
                    "defense.name=dnc", *overrides)
