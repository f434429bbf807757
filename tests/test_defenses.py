"""Defense strategies on hand-made client updates, against numpy / flip_fl.defenses references.

The strategies run their real `aggregate_train` on Flower Messages built here (no Ray): replies
arrive shuffled, the strategy sorts them, aggregates, applies the server learning rate and records
detection metrics. Client 3 is the attacker: its update is a large step against the benign direction.
The model has BatchNorm statistics: rules other than median / trimmed mean see only the trained
parameters (P) and the statistics follow the rule's client weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from scipy import stats

from flip_fl.config import ConfigError
from flip_fl.defenses.flame import flame
from flip_fl.defenses.fltrust import evaluation_set, root_split
from flip_fl.defenses.foolsgold import foolsgold
from flip_fl.defenses.krum import krum
from flip_fl.defenses.rfa import geometric_median
from flip_fl.defenses.updates import bn_statistic_mask, flatten_state
from flip_fl.federation.rounds import RoundRecord
from strategies import DEFENSES, build_strategy
from strategies.seeded_fedavg import arrays_to_numpy
from tests.reference_rules import iterated_bulyan
from tests.tiny import tiny_config

N, BAD = 7, 3
EXAMPLES = [30, 10, 20, 40, 25, 15, 35]
SHAPES = {"conv.weight": (3, 2), "bn.weight": (2,), "bn.running_mean": (2,), "bn.running_var": (2,),
          "fc.weight": (2, 3), "fc.bias": (2,)}


def make_global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    state["bn.running_var"] = np.abs(state["bn.running_var"]) + 1
    state["bn.num_batches_tracked"] = np.array(100, dtype=np.int64)
    return state


def make_updates(seed: int = 1, outlier: float = -10.0) -> list[dict[str, np.ndarray]]:
    """Benign updates = a shared direction (|entries| >= 0.5) + small noise; client BAD = outlier * direction."""
    rng = np.random.default_rng(seed)
    direction = {k: (rng.choice([-1.0, 1.0], size=s) * rng.uniform(0.5, 1.0, size=s)) for k, s in SHAPES.items()}
    updates = []
    for i in range(N):
        upd = {k: (outlier * d if i == BAD else d + 0.05 * rng.normal(size=d.shape)) for k, d in direction.items()}
        upd["bn.num_batches_tracked"] = np.array(50 if i == BAD else 5)
        updates.append(upd)
    return updates


def reply(node: int, state: dict[str, np.ndarray], examples: int) -> Message:
    meta = Metadata(run_id=0, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="", group_id="",
                    created_at=0.0, ttl=3600.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()}),
                          "weights": MetricRecord({"num-examples": examples, "unit-weight": 1}),
                          "client-metrics": ConfigRecord({"train_loss": 1.0})})
    return Message(content, metadata=meta)


def strategy(name: str, *overrides: str):
    cfg = tiny_config(f"defense.name={name}", "federation.num_clients=8", f"federation.clients_per_round={N}",
                      f"attack.malicious_ids=[{BAD}]", *overrides)
    return build_strategy(cfg, {100 + pid: pid for pid in range(8)}, {})


def aggregate(strat, global_state, updates, server_round: int = 1, attacking=(BAD,)):
    """Run the strategy's aggregate_train on shuffled replies; (new global, delta matrix U, round extra)."""
    strat.global_state = global_state
    strat.rounds[server_round] = RoundRecord(sampled=list(range(N)), malicious=[BAD], attacking=list(attacking),
                                             started=0.0)
    states = [{k: (global_state[k] + u[k]).astype(global_state[k].dtype) for k in global_state} for u in updates]
    order = np.random.default_rng(server_round).permutation(N)
    new, _ = strat.aggregate_train(server_round, [reply(100 + int(i), states[i], EXAMPLES[i]) for i in order])
    keys = list(global_state)
    U = flatten_state(states, keys) - flatten_state([global_state], keys)[0]
    return arrays_to_numpy(new), U, strat.rounds[server_round].extra


def flat(state: dict[str, np.ndarray]) -> np.ndarray:
    return flatten_state([state], list(state))[0]


def applied_delta(new, global_state) -> np.ndarray:
    return flat(new) - flat(global_state)


INTEGER = np.concatenate([np.full(np.asarray(v).size, np.issubdtype(np.asarray(v).dtype, np.integer))
                          for v in make_global().values()])


def assert_update(new, global_state, expected, atol: float = 1e-5) -> None:
    """new - global equals `expected` on float entries; integer counters get it rounded."""
    actual = applied_delta(new, global_state)
    np.testing.assert_allclose(actual[~INTEGER], expected[~INTEGER], atol=atol)
    np.testing.assert_allclose(actual[INTEGER], np.rint(flat(global_state)[INTEGER] + expected[INTEGER])
                               - flat(global_state)[INTEGER])


P = ~bn_statistic_mask(make_global())


def with_statistics(U: np.ndarray, param_delta: np.ndarray, weights) -> np.ndarray:
    """The full expected update: the rule's result on P, the weighted mean of the clients' statistics elsewhere."""
    out = np.empty(U.shape[1])
    out[P] = param_delta
    out[~P] = np.asarray(weights, dtype=float) @ U[:, ~P]
    return out


# ------------------------------------------------------------------------------------------ registry


def test_registry_matches_the_config_choices():
    assert set(DEFENSES) == set(DEFENSES.names) and DEFENSES.missing() == [] and len(DEFENSES) == 13
    assert type(strategy("fedavg")).__name__ == "DefenseStrategy"
    assert all(type(strategy(name)).name == name for name in DEFENSES if name != "bulyan")


@pytest.mark.parametrize("overrides, message", [
    (["defense.name=bulyan", "federation.clients_per_round=6"], "defense.num_malicious: bulyan needs"),
    (["defense.name=krum", "defense.num_malicious=7"], "defense.num_malicious: f = 7 must be below"),
    (["defense.multikrum_select=9"], "defense.multikrum_select: 9 exceeds"),
    (["defense.name=fltrust", "defense.root_size=300"], "defense.root_size: 300 root images"),
    (["defense.name=trimmed"], "defense.name: 'trimmed' is not allowed"),
])
def test_impossible_defense_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("federation.num_clients=8", "federation.clients_per_round=7", "attack.num_malicious=1", *overrides)


# ------------------------------------------------------------------------------------------ rules


def test_fedavg_is_the_example_weighted_mean_with_server_lr():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("fedavg", "server.lr=0.5"), g, ups)
    w = np.asarray(EXAMPLES, float) / sum(EXAMPLES)
    assert_update(new, g, 0.5 * w @ U, atol=1e-5)
    assert extra["aggregation_seconds"] >= 0 and "defense_weights" not in extra


def test_krum_selects_one_benign_update_like_the_numpy_rule():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("krum"), g, ups)
    ref = krum(U[:, P], num_malicious=1, strict=False)
    assert_update(new, g, with_statistics(U, ref.delta, ref.weights), atol=1e-5)
    assert extra["defense_kept"] == [int(np.flatnonzero(ref.kept)[0])] and BAD in extra["defense_rejected"]
    assert extra["detection_recall"] == 1.0 and extra["detection_tp"] == 1 and extra["detection_fp"] == N - 2
    assert extra["defense_attacker_weight"] == 0.0


def test_multikrum_averages_the_n_minus_f_best_weighted_by_examples():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("multikrum"), g, ups)
    ref = krum(U[:, P], num_malicious=1, multi_k=N - 1, weights=EXAMPLES, strict=False)
    assert_update(new, g, with_statistics(U, ref.delta, ref.weights), atol=1e-5)
    assert extra["defense_rejected"] == [BAD] and extra["detection_precision"] == 1.0
    np.testing.assert_allclose(extra["defense_weights"], ref.weights, atol=1e-6)


@pytest.mark.parametrize("selection", ["iterated", "one_shot"])
def test_bulyan_selection_then_coordinate_trimmed_mean(selection):
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("bulyan", f"defense.bulyan_selection={selection}"), g, ups)
    theta, beta = N - 2, N - 4
    if selection == "one_shot":
        kept = krum(U[:, P], num_malicious=1, multi_k=theta, strict=False).kept
    else:
        kept = np.isin(np.arange(N), iterated_bulyan(U[:, P], 1).arrays["selection_order"])
    selected = U[kept][:, P]
    med = np.median(selected, axis=0)
    idx = np.argsort(np.abs(selected - med), axis=0, kind="stable")[:beta]
    expected = np.take_along_axis(selected, idx, axis=0).mean(axis=0)
    w = np.where(kept, EXAMPLES, 0) / np.sum(np.where(kept, EXAMPLES, 0))
    assert_update(new, g, with_statistics(U, expected, w), atol=1e-4)
    assert BAD in extra["defense_rejected"] and len(extra["defense_kept"]) == theta
    assert extra["defense_skipped"] is False and extra["defense_selection"] == selection


def test_median_matches_numpy_and_never_takes_the_outlier():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("median"), g, ups)
    assert_update(new, g, np.median(U, axis=0), atol=1e-5)
    assert extra["defense_weights"][BAD] == 0.0 and extra["defense_attacker_weight"] == 0.0
    assert sum(extra["defense_weights"]) == pytest.approx(1.0, abs=1e-5)


def test_trimmed_mean_matches_scipy_and_trims_the_outlier():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("trimmed_mean", "defense.trim_beta=0.2"), g, ups)
    assert_update(new, g, stats.trim_mean(U, 0.2, axis=0), atol=1e-5)
    assert extra["defense_weights"][BAD] == 0.0 and extra["defense_num_trimmed_per_side"] == 1


def test_norm_clip_scales_each_update_into_the_ball():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("norm_clip", "defense.clip_norm=1.5"), g, ups)
    scale = np.minimum(1.0, 1.5 / np.linalg.norm(U[:, P], axis=1))
    w = np.asarray(EXAMPLES, float) / sum(EXAMPLES)
    assert_update(new, g, with_statistics(U, (w * scale) @ U[:, P], w), atol=1e-5)
    np.testing.assert_allclose(extra["defense_scales"], scale, atol=1e-6)
    median_clip = aggregate(strategy("norm_clip"), g, ups)[2]
    assert median_clip["defense_max_norm"] == pytest.approx(np.median(np.linalg.norm(U[:, P], axis=1)))


def test_weak_dp_adds_seeded_noise_to_parameters_only():
    g, ups = make_global(), make_updates()
    noiseless = strategy("weak_dp", "defense.noise_std=0", "defense.clip_norm=1.5")
    clipped = applied_delta(aggregate(noiseless, g, ups)[0], g)
    reference = applied_delta(aggregate(strategy("norm_clip", "defense.clip_norm=1.5"), g, ups)[0], g)
    np.testing.assert_allclose(clipped, reference, atol=1e-6)
    noisy = [applied_delta(aggregate(strategy("weak_dp", "defense.noise_std=0.5", "defense.clip_norm=1.5",
                                              "server.lr=0.5"), g, ups)[0], g) for _ in range(2)]
    np.testing.assert_array_equal(noisy[0], noisy[1])  # same seed and round, same noise
    noise = noisy[0] - 0.5 * reference
    assert np.all(noise[~P & ~INTEGER] == pytest.approx(0.0, abs=1e-6))
    assert 0.2 < np.std(noise[P]) < 0.9  # std 0.5 reaches the model whatever server.lr


def test_rfa_is_the_weiszfeld_geometric_median():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("rfa"), g, ups)
    ref = geometric_median(U[:, P], EXAMPLES, iters=100)
    assert_update(new, g, with_statistics(U, ref.delta, ref.weights), atol=1e-5)
    assert extra["defense_weights"][BAD] < 0.05 and extra["defense_converged"] is True


def test_rlr_flips_coordinates_without_sign_agreement():
    g, ups = make_global(), make_updates()
    strat = strategy("rlr", "defense.rlr_threshold=6")
    new, U, extra = aggregate(strat, g, ups)
    w = np.asarray(EXAMPLES, float) / sum(EXAMPLES)
    agree = np.abs(np.sign(U[:, P]).sum(axis=0))
    lr = np.where(agree < 6, -1.0, 1.0)
    assert_update(new, g, with_statistics(U, lr * (w @ U[:, P]), w), atol=1e-5)
    assert extra["defense_num_flipped"] == int((lr < 0).sum()) > 0


def test_foolsgold_zeroes_identical_sybils_and_keeps_history_per_partition():
    g = make_global()
    rng = np.random.default_rng(5)
    sybil = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    ups = [{k: (sybil[k] if i in (3, 5) else rng.normal(size=s)) for k, s in SHAPES.items()} for i in range(N)]
    for u in ups:
        u["bn.num_batches_tracked"] = np.array(5)
    strat = strategy("foolsgold")
    new, U, extra = aggregate(strat, g, ups, attacking=(3, 5))
    ref = foolsgold(U[:, P])
    assert_update(new, g, with_statistics(U, ref.delta, ref.weights), atol=1e-5)
    assert extra["defense_weights"][3] == extra["defense_weights"][5] == 0.0
    assert extra["defense_rejected"] == [3, 5] and extra["detection_recall"] == 1.0
    assert extra["detection_precision"] == 1.0 and extra["defense_attacker_weight"] == 0.0
    assert sorted(strat.history) == list(range(N))
    aggregate(strat, g, ups, server_round=2, attacking=(3, 5))
    np.testing.assert_allclose(strat.history[0], 2 * U[0][P], rtol=1e-5)


def test_fltrust_trusts_by_cosine_to_the_server_update(monkeypatch):
    g, ups = make_global(), make_updates()
    strat = strategy("fltrust", "defense.root_size=20")
    g0 = flat({k: np.asarray(v, float) for k, v in make_updates(outlier=1.0)[0].items()})[P]
    monkeypatch.setattr(strat, "server_update", lambda server_round: g0)
    new, U, extra = aggregate(strat, g, ups)
    norms = np.linalg.norm(U[:, P], axis=1)
    trust = np.maximum(U[:, P] @ g0 / (norms * np.linalg.norm(g0)), 0)
    expected = (trust * np.linalg.norm(g0) / norms) @ U[:, P] / trust.sum()
    assert_update(new, g, with_statistics(U, expected, trust / trust.sum()), atol=1e-5)
    assert extra["defense_rejected"] == [BAD] and extra["detection_recall"] == 1.0


def test_fltrust_root_data_is_held_out_of_evaluation_and_trains_the_server_update():
    cfg = tiny_config("defense.name=fltrust", "defense.root_size=40")
    root, rest = root_split(cfg, 300)
    assert len(root) == 40 and len(rest) == 260 and not set(root) & set(rest)
    np.testing.assert_array_equal(root, root_split(cfg, 300)[0])
    from flip_fl.data import load_datasets
    from flip_fl.models import build_model

    test = load_datasets(cfg)[1]
    assert len(evaluation_set(cfg, test)) == 260 and len(evaluation_set(tiny_config(), test)) == 300
    strat = build_strategy(cfg, {10 + i: i for i in range(6)}, {})
    strat.global_state = {k: v.numpy() for k, v in build_model(cfg.model, test).state_dict().items()}
    g0 = strat.server_update(1)
    assert g0.shape == (strat.parameter_mask().sum(),) and np.isfinite(g0).all() and np.linalg.norm(g0) > 0
    np.testing.assert_array_equal(g0, strat.server_update(1))


def test_flame_excludes_the_outlier_clips_and_adds_noise_to_parameters_only():
    g, ups = make_global(), make_updates()
    new, U, extra = aggregate(strategy("flame", "defense.flame_lambda=0"), g, ups)
    kept = np.isin(np.arange(N), extra["defense_kept"])
    assert not kept[BAD] and kept.sum() >= N // 2 + 1 and extra["detection_recall"] == 1.0
    np.testing.assert_array_equal(kept, flame(U[:, P], None, 0.0, None).kept)
    norms = np.linalg.norm(U[:, P], axis=1)
    expected = (np.minimum(1.0, np.median(norms) / norms)[kept] @ U[kept][:, P]) / kept.sum()
    expected = with_statistics(U, expected, kept / kept.sum())
    assert_update(new, g, expected, atol=1e-5)
    noisy = applied_delta(aggregate(strategy("flame", "defense.flame_lambda=0.1"), g, ups)[0], g) - expected
    assert np.all(noisy[~P & ~INTEGER] == pytest.approx(0.0, abs=1e-6))
    assert np.std(noisy[P]) > 0.01


def test_rounds_without_attackers_report_false_rejections_only():
    g, ups = make_global(), make_updates()
    extra = aggregate(strategy("krum"), g, ups, attacking=())[2]
    assert extra["detection_recall"] is None and extra["detection_fp"] == N - 1
    assert extra["defense_attacker_weight"] is None


def test_batchnorm_counters_do_not_steer_selection():
    """A benign client with many more local steps (batch counter +5000 instead of +5) changes no
    selection, weight or clip factor: the statistics are outside what the rules compare."""
    g, ups = make_global(), make_updates()
    busy = [dict(u) for u in ups]
    busy[0]["bn.num_batches_tracked"] = np.array(5000)
    for name in ("krum", "multikrum", "norm_clip", "rfa", "foolsgold", "flame"):
        plain, loud = (aggregate(strategy(name), g, u)[2] for u in (ups, busy))
        for key in ("defense_kept", "defense_weights", "defense_scales"):
            assert plain.get(key) == loud.get(key), (name, key)
