"""FoolsGold (`strategies/foolsgold.py`, `flip_fl.defenses.foolsgold.foolsgold`): the numpy rule against the
authors' algorithm, the strategy on hand-made rounds (sybils, per-partition histories, output-layer features)
and its checkpointed state."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flip_fl.config import round_sampler
from flip_fl.defenses.foolsgold import foolsgold
from strategies.foolsgold import FoolsGoldDefense
from tests.defenses.rounds import (
    SHAPES,
    P,
    aggregate,
    assert_update,
    make_global,
    make_updates,
    strategy,
    with_statistics,
)
from tests.tiny import tiny_config

# --------------------------------------------------------------------------- numpy rule


def ref_foolsgold(H, kappa=1.0):
    """Reference FoolsGold weights, following the authors' published algorithm."""
    n = H.shape[0]
    cs = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            ni, nj = np.linalg.norm(H[i]), np.linalg.norm(H[j])
            cs[i, j] = (H[i] @ H[j]) / (ni * nj) if ni > 0 and nj > 0 else 0.0
        cs[i, i] -= 1.0
    maxcs = cs.max(axis=1)
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i, j] = cs[i, j] * maxcs[i] / maxcs[j]
    wv = [min(1.0, max(0.0, 1.0 - max(cs[i]))) for i in range(n)]
    top = max(wv)
    wv = [w / top for w in wv]
    wv = [0.99 if w == 1.0 else w for w in wv]
    out = []
    for w in wv:
        v = kappa * (math.log(w / (1 - w)) + 0.5) if w > 0 else 0.0
        out.append(min(1.0, max(0.0, v)))
    return np.array(out)


def sybil_setup(seed=0, d=40):
    rng = np.random.default_rng(seed)
    honest = rng.standard_normal((5, d))  # diverse directions
    sybil = np.tile(rng.standard_normal(d), (3, 1))  # 3 identical sybils
    return np.vstack([honest, sybil])


def test_foolsgold_downweights_identical_sybils():
    U = sybil_setup()
    out = foolsgold(U, None)
    assert np.all(out.arrays["scores"][5:] == 0.0)
    assert not out.kept[5:].any() and out.kept[:5].all()
    assert np.all(out.arrays["scores"][:5] > 0.5)
    np.testing.assert_allclose(out.delta, (out.arrays["scores"][:5] @ U[:5]) / out.arrays["scores"][:5].sum())
    np.testing.assert_allclose(out.arrays["history"], U)


@pytest.mark.parametrize("kappa", [1.0, 0.5])
def test_foolsgold_matches_reference(kappa):
    rng = np.random.default_rng(8)
    base = rng.standard_normal(20)
    U = np.vstack([rng.standard_normal((4, 20)), base + 0.3 * rng.standard_normal((3, 20))])
    hist = rng.standard_normal((7, 20))
    out = foolsgold(U, hist, confidence=kappa, epsilon=0.0)
    np.testing.assert_allclose(out.arrays["scores"], ref_foolsgold(hist + U, kappa), atol=1e-12)
    un = foolsgold(U, hist, confidence=kappa, epsilon=0.0, normalize=False)
    np.testing.assert_allclose(un.delta, out.arrays["scores"] @ U / 7)


def test_foolsgold_history_accumulates_and_mask():
    U1, U2 = sybil_setup(1), sybil_setup(2)
    first = foolsgold(U1, None)
    second = foolsgold(U2, first.arrays["history"])
    np.testing.assert_allclose(second.arrays["history"], U1 + U2)
    mask = np.zeros(U1.shape[1], dtype=bool)
    mask[:10] = True
    m = foolsgold(U1, None, similarity_mask=mask)
    assert m.arrays["history"].shape == (8, 10)
    with pytest.raises(ValueError, match="history"):
        foolsgold(U1, np.zeros((8, 40)), similarity_mask=mask)


def test_foolsgold_all_identical_gives_zero_delta():
    U = np.tile(np.arange(1.0, 5.0), (4, 1))
    out = foolsgold(U)
    assert np.all(out.delta == 0) and not out.kept.any()


# --------------------------------------------------------------------------- strategy


def sybil_updates(n: int = 7, sybils=(3, 5)) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    sybil = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    ups = [{k: (sybil[k] if i in sybils else rng.normal(size=s)) for k, s in SHAPES.items()} for i in range(n)]
    for u in ups:
        u["bn.num_batches_tracked"] = np.array(5)
    return ups


def test_foolsgold_zeroes_identical_sybils_and_keeps_history_per_partition():
    g, ups = make_global(), sybil_updates()
    n = len(ups)
    strat = strategy("foolsgold")
    new, U, extra = aggregate(strat, g, ups, attacking=(3, 5))
    ref = foolsgold(U[:, P])
    assert_update(new, g, with_statistics(U, ref.delta, ref.weights), atol=1e-5)
    assert extra["defense_weights"][3] == extra["defense_weights"][5] == 0.0
    assert extra["defense_rejected"] == [3, 5] and extra["detection_recall"] == 1.0
    assert extra["detection_precision"] == 1.0 and extra["defense_attacker_weight"] == 0.0
    assert sorted(strat.history) == list(range(n))
    aggregate(strat, g, ups, server_round=2, attacking=(3, 5))
    np.testing.assert_allclose(strat.history[0], 2 * U[0][P], rtol=1e-5)


def test_foolsgold_output_layer_features_compare_the_last_layer_only():
    g, ups = make_global(), make_updates()
    strat = strategy("foolsgold", "defense.foolsgold.features=output_layer", "defense.foolsgold.confidence=0.5")
    _, U, _ = aggregate(strat, g, ups)
    last = np.concatenate([np.full(g[k].size, k.startswith("fc.")) for k in g])  # fc.weight, fc.bias
    assert strat.features == "output_layer" and strat.confidence == 0.5
    np.testing.assert_allclose(strat.history[0], U[0][last], rtol=1e-5)


def test_foolsgold_histories_survive_a_state_dict_round_trip():
    cfg = tiny_config("defense.name=foolsgold")
    kwargs = {"node_partitions": {10 + i: i for i in range(6)}, "sampler": round_sampler(cfg),
              "benign_client": "clients.BenignClient", "malicious_client": "clients.PoisonClient"}
    a, b = FoolsGoldDefense(**kwargs), FoolsGoldDefense(**kwargs)
    a.history = {2: np.arange(4, dtype=np.float32), 5: -np.ones(4, np.float32)}
    b.load_state_dict(a.state_dict())
    assert b.history.keys() == a.history.keys() and all(np.array_equal(b.history[k], a.history[k]) for k in a.history)
    a.history[2][0] = 99  # a state_dict is a copy, not a view of the live histories
    assert b.history[2][0] == 0
    with pytest.raises(ValueError, match="unexpected entries"):
        b.load_state_dict({"weights": np.ones(2)})
