import math

import pytest
import torch
from torch import nn

from flip_fl.attacks.poisoning import (
    model_replacement_scale,
    num_poison_for_batch,
    poison_batch,
    project_l2,
    scale_update,
    update_norm,
)
from flip_fl.attacks.triggers import create_trigger

# ---------------------------------------------------------------- poison_batch


@pytest.mark.parametrize("piece", [None, 2])
def test_poison_batch_stamps_first_k_and_relabels(piece):
    trig = create_trigger("dba", (1, 28, 28))
    x = torch.rand(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    x0, y0 = x.clone(), y.clone()
    x2, y2 = poison_batch(x, y, trig, target_label=2, num_poison=20, piece=piece)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert torch.equal(x2[:20], trig.apply(x[:20], piece))
    assert torch.equal(x2[20:], x[20:])
    assert torch.all(y2[:20] == 2)
    assert torch.equal(y2[20:], y[20:])
    assert y2.dtype == y.dtype


def test_poison_batch_clips_and_zero():
    trig = create_trigger("pixel_pattern", (3, 32, 32))
    x, y = torch.rand(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)
    x2, y2 = poison_batch(x, y, trig, 4, num_poison=100)
    assert torch.equal(x2, trig.apply(x)) and torch.all(y2 == 4)
    x3, y3 = poison_batch(x, y, trig, 4, num_poison=0)
    assert torch.equal(x3, x) and torch.equal(y3, y)
    assert x3.data_ptr() != x.data_ptr()
    with pytest.raises(ValueError):
        poison_batch(x, y, trig, 4, num_poison=-1)


def test_num_poison_for_batch():
    assert num_poison_for_batch(64, count=20) == 20
    assert num_poison_for_batch(10, count=20) == 10
    assert num_poison_for_batch(64, fraction=20 / 64) == 20
    assert num_poison_for_batch(64, fraction=5 / 64) == 5
    assert num_poison_for_batch(16, fraction=20 / 64) == 5
    assert num_poison_for_batch(25, fraction=0.1) == 3  # 2.5 rounds up
    assert num_poison_for_batch(24, fraction=0.1) == 2  # 2.4 rounds down
    assert num_poison_for_batch(7, fraction=1.0) == 7
    for kwargs in ({}, {"fraction": 0.1, "count": 2}, {"fraction": 1.5}, {"count": -1}):
        with pytest.raises(ValueError):
            num_poison_for_batch(64, **kwargs)


# ---------------------------------------------------------------- model replacement


def _model_state(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    model.train()
    model(torch.randn(4, 1, 6, 6))  # move BN running stats and num_batches_tracked
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_model_replacement_scale_values():
    assert model_replacement_scale(10, 0.1, weighted=False) == pytest.approx(100.0)
    assert model_replacement_scale(10, 1.0) == pytest.approx(10.0)
    # weighted: N / (eta * n_att)
    weighted = model_replacement_scale(10, 1.0, weighted=True, total_examples=6000, attacker_examples=600)
    assert weighted == pytest.approx(10.0)
    weighted = model_replacement_scale(10, 0.5, weighted=True, total_examples=1000, attacker_examples=50)
    assert weighted == pytest.approx(40.0)
    with pytest.raises(ValueError):
        model_replacement_scale(10, 1.0, weighted=True)
    with pytest.raises(ValueError):
        model_replacement_scale(10, 0.0)
    with pytest.raises(ValueError):
        model_replacement_scale(0, 0.1)


def test_scaled_attacker_replaces_global_unweighted():
    g, local = _model_state(0), _model_state(1)
    gamma = model_replacement_scale(10, 0.1)
    assert gamma == pytest.approx(100.0)
    submitted = scale_update(g, local, gamma)
    eta = 0.1
    for k in g:
        if not g[k].is_floating_point():
            assert torch.equal(submitted[k], local[k])
            continue
        deltas = [submitted[k] - g[k]] + [torch.zeros_like(g[k])] * 9
        new_global = g[k] + eta * torch.stack(deltas).mean(0)
        torch.testing.assert_close(new_global, local[k], atol=1e-5, rtol=1e-5)


def test_scaled_attacker_replaces_global_weighted():
    g, local = _model_state(0), _model_state(1)
    n = [600, 300, 100]  # attacker first
    eta = 1.0
    gamma = model_replacement_scale(3, eta, weighted=True, total_examples=sum(n), attacker_examples=n[0])
    submitted = scale_update(g, local, gamma)
    k = "3.weight"
    agg = n[0] / sum(n) * (submitted[k] - g[k])  # benign deltas are 0
    torch.testing.assert_close(g[k] + eta * agg, local[k], atol=1e-5, rtol=1e-5)


def test_scale_update_hand_example_and_purity():
    g = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    local = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(5)}
    out = scale_update(g, local, 10.0)
    assert torch.equal(out["w"], torch.tensor([11.0, -18.0]))
    assert torch.equal(out["n"], torch.tensor(5)) and out["n"].dtype == torch.int64
    assert out["n"].data_ptr() != local["n"].data_ptr()
    assert torch.equal(g["w"], torch.tensor([1.0, 2.0])) and torch.equal(local["w"], torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="keys"):
        scale_update(g, {"w": local["w"]}, 1.0)


# ---------------------------------------------------------------- norm and projection


def test_update_norm_hand_example_skips_int():
    g = {"a": torch.zeros(2), "b": torch.zeros(1, 1), "n": torch.tensor(0)}
    local = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]]), "n": torch.tensor(100)}
    assert update_norm(g, local) == pytest.approx(5.0)
    assert update_norm(g, g) == 0.0


def test_project_l2_outside_hits_eps_and_keeps_direction():
    g, local = _model_state(0), _model_state(1)
    norm = update_norm(g, local)
    eps = norm / 4
    proj = project_l2(g, local, eps)
    assert update_norm(g, proj) == pytest.approx(eps, rel=1e-5)
    for k in g:
        if g[k].is_floating_point():
            torch.testing.assert_close(proj[k] - g[k], (local[k] - g[k]) * (eps / norm), atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(proj[k], local[k])
    # direction: cosine 1 with the original update
    d0 = torch.cat([(local[k] - g[k]).flatten() for k in g if g[k].is_floating_point()])
    d1 = torch.cat([(proj[k] - g[k]).flatten() for k in g if g[k].is_floating_point()])
    assert torch.nn.functional.cosine_similarity(d0, d1, dim=0).item() == pytest.approx(1.0, abs=1e-5)


def test_project_l2_inside_returns_local_unchanged():
    g, local = _model_state(0), _model_state(1)
    eps = update_norm(g, local) * 2
    proj = project_l2(g, local, eps)
    for k in local:
        assert torch.equal(proj[k], local[k])
        assert proj[k].data_ptr() != local[k].data_ptr()
    with pytest.raises(ValueError):
        project_l2(g, local, -1.0)


def test_project_l2_hand_example():
    g = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(7)}
    local = {"w": torch.tensor([4.0, 5.0]), "n": torch.tensor(9)}  # delta (3, 4), norm 5
    out = project_l2(g, local, 2.5)
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 3.0]))
    assert out["n"].item() == 9
    assert math.isclose(update_norm(g, out), 2.5, rel_tol=1e-6)
