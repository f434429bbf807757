import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flip_fl.attacks.flip_labels import (
    AugmentSettings,
    ExpertSettings,
    MatchSettings,
    SGDHyper,
    load_trajectory,
    momentum_buffers,
    optimize_labels,
    sgd_step_functional,
    train_expert,
)
from flip_fl.attacks.triggers import create_trigger
from flip_fl.data import make_synthetic


def _bn_net(in_channels: int = 2, num_classes: int = 5) -> nn.Module:
    """conv-BN-ReLU twice and a linear head (the project's tiny_cnn has no BatchNorm)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes),
    )


def _stepped_model(momentum, nesterov, dampening, weight_decay):
    """A BatchNorm model and an SGD optimizer that already took two steps (non-zero buffers)."""
    torch.manual_seed(0)
    model = _bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.07, momentum=momentum, nesterov=nesterov,
                          dampening=dampening, weight_decay=weight_decay)
    model.train()
    for _ in range(2):
        xb, yb = torch.rand(12, 2, 8, 8), torch.randint(0, 5, (12,))
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize(
    "momentum,nesterov,dampening,weight_decay",
    [(0.9, True, 0.0, 2e-4), (0.9, False, 0.1, 5e-3), (0.0, False, 0.0, 1e-3)],
)
def test_functional_step_matches_torch_sgd(momentum, nesterov, dampening, weight_decay):
    model, opt = _stepped_model(momentum, nesterov, dampening, weight_decay)
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    if momentum:
        assert all(b is not None and b.abs().sum() > 0
                   for b in momentum_buffers(model, opt_state).values())

    x, y = torch.rand(16, 2, 8, 8), torch.randint(0, 5, (16,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    expected = dict(model.named_parameters())

    fresh = _bn_net()
    names = [n for n, _ in fresh.named_parameters()]
    params = {n: model_state[n] for n in names}
    buffers = {n: v for n, v in model_state.items() if n not in names}
    buffers_before = {n: v.clone() for n, v in buffers.items()}
    new = sgd_step_functional(params, buffers, fresh.train(), x, F.one_hot(y, 5).float(),
                              momentum_buffers(fresh, opt_state),
                              SGDHyper.from_optimizer_state(opt_state))
    for n in names:
        assert (new[n] - expected[n]).abs().max() < 1e-5, n
        assert not torch.equal(new[n], model_state[n])
    for n, v in buffers.items():  # running stats are not written back
        assert torch.equal(v, buffers_before[n])


def test_momentum_buffers_follow_named_parameters_order():
    model, opt = _stepped_model(0.9, True, 0.0, 0.0)
    bufs = momentum_buffers(model, opt.state_dict())
    assert list(bufs) == [n for n, _ in model.named_parameters()]
    for (n, p) in model.named_parameters():
        assert torch.equal(bufs[n], opt.state[p]["momentum_buffer"])


def test_gradient_flows_to_logits():
    model, opt = _stepped_model(0.9, True, 0.0, 2e-4)
    names = [n for n, _ in model.named_parameters()]
    state = model.state_dict()
    params = {n: state[n] for n in names}
    x, y = torch.rand(16, 2, 8, 8), torch.randint(0, 5, (16,))
    logits = (5 * F.one_hot(y, 5).float()).requires_grad_(True)
    new = sgd_step_functional(params, {n: v for n, v in state.items() if n not in names}, model, x,
                              torch.softmax(logits, 1), momentum_buffers(model, opt.state_dict()),
                              SGDHyper.from_optimizer_state(opt.state_dict()))
    goal = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in params.items()}
    loss = sum(((new[n] - goal[n]) ** 2).sum() for n in names)
    (grad,) = torch.autograd.grad(loss, [logits])
    assert torch.isfinite(grad).all()
    assert (grad.abs().sum(dim=1) > 0).all()


def test_optimize_labels_reduces_loss_and_keeps_trajectory(tmp_path):
    g = torch.Generator().manual_seed(0)
    train, _ = make_synthetic(0, 1, 8, 120, 1, 0.1, 4)
    x, y = train.batch(slice(None))
    trigger = create_trigger("sinusoidal", (1, 8, 8), amplitude=0.15, frequency=2).apply
    model_fn = lambda: _bn_net(1, 4)  # noqa: E731
    train_expert(model_fn, x, y, trigger, 1, 3,
                 ExpertSettings(epochs=2, batch_size=32, lr=0.05, checkpoint_every=4,
                                augment=AugmentSettings(enabled=False)), tmp_path, g)
    traj = load_trajectory(tmp_path)
    start = traj[2:3]  # one checkpoint: the same batches repeat, so the loss must fall
    snapshot = copy.deepcopy(start[0])

    losses = []
    settings = MatchSettings(passes=8, batch_size=40, augment=AugmentSettings(enabled=False))
    logits = optimize_labels(model_fn, start, x, y, trigger, 1, 3, settings, g,
                             progress=lambda info: losses.append(info["loss"]))
    per_pass = len(losses) // 8
    assert len(losses) == 8 * per_pass and per_pass == 4  # 120 + 30 copies in batches of 40
    first, last = sum(losses[:per_pass]), sum(losses[-per_pass:])
    assert last < 0.9 * first, (first, last)
    assert logits.shape == (120, 4) and not logits.requires_grad
    assert not torch.allclose(logits, 5 * F.one_hot(y, 4).float())

    for k, v in snapshot.model_state.items():
        assert torch.equal(start[0].model_state[k], v)
    for i, st in snapshot.optimizer_state["state"].items():
        assert torch.equal(start[0].optimizer_state["state"][i]["momentum_buffer"],
                           st["momentum_buffer"])

    # per-batch checkpoint sampling over the whole trajectory runs too
    optimize_labels(model_fn, traj, x, y, trigger, 1, 3,
                    MatchSettings(passes=1, batch_size=64, checkpoint_per="batch"), g)


def test_matching_loss_is_zero_without_poison_and_respects_frozen_params():
    from flip_fl.attacks.flip_labels.experts import Checkpoint
    from flip_fl.attacks.flip_labels.matching import _Start, matching_loss

    model, opt = _stepped_model(0.9, True, 0.0, 2e-4)
    ckpt = Checkpoint(3, copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    scratch = _bn_net()
    scratch[0].bias.requires_grad_(False)  # frozen: the real SGD step leaves it alone
    scratch_opt = torch.optim.SGD(scratch.parameters(), lr=0.0)
    start = _Start(ckpt, scratch, torch.device("cpu"))
    assert "0.bias" not in start.params and "0.bias" in start.buffers
    x, y = torch.rand(16, 2, 8, 8), torch.randint(0, 5, (16,))
    loss = matching_loss(scratch, scratch_opt, start, x, y, x, F.one_hot(y, 5).float())
    assert loss.item() < 1e-8
    assert torch.equal(scratch[0].bias, ckpt.model_state["0.bias"])
    loss = matching_loss(scratch, scratch_opt, start, x, y, x, torch.full((16, 5), 0.2))
    assert loss.item() > 1e-3
