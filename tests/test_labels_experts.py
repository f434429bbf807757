import pytest
import torch
from torch import nn

from flip_fl.attacks.flip_labels import AugmentSettings, ExpertSettings, checkpoint_steps, load_trajectory, train_expert
from flip_fl.attacks.flip_labels.common import PoisonedData, poison_source_indices
from flip_fl.attacks.triggers import create_trigger
from flip_fl.data import make_synthetic

NUM_CLASSES = 3


def _bn_net(in_channels: int, num_classes: int) -> nn.Module:
    """A minimal BatchNorm CNN (the project's tiny_cnn has no BatchNorm)."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, num_classes))


def _xy(n):
    train, _ = make_synthetic(0, 1, 8, n, 1, 0.1, NUM_CLASSES)
    return train.batch(slice(None))


def _sine():
    return create_trigger("sinusoidal", (1, 8, 8), amplitude=0.1, frequency=2).apply


def _settings(**kw):
    base = dict(epochs=3, batch_size=16, lr=0.05, checkpoint_every=4)
    base.update(kw)
    return ExpertSettings(**base)


def test_checkpoint_steps():
    assert checkpoint_steps(15, 4) == [0, 4, 8, 12, 15]
    assert checkpoint_steps(12, 4) == [0, 4, 8, 12]
    assert checkpoint_steps(3, 50) == [0, 3]


def test_trajectory_written_at_interval_and_reloads_exactly(tmp_path):
    x, y = _xy(50)  # 50 + 50 // 3 = 66 items, batch 16 -> 5 steps per epoch, 15 in all
    expert = train_expert(lambda: _bn_net(1, NUM_CLASSES), x, y, _sine(), 1, 2,
                          _settings(), tmp_path, torch.Generator().manual_seed(0))
    assert expert.checkpoint_steps == [0, 4, 8, 12, 15]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"step_{s:09d}.pt" for s in [0, 4, 8, 12, 15]]

    traj = load_trajectory(tmp_path)
    assert [c.step for c in traj] == [0, 4, 8, 12, 15]
    last = traj[-1]
    model_state = expert.model.state_dict()
    assert last.model_state.keys() == model_state.keys()
    for k, v in model_state.items():
        assert torch.equal(last.model_state[k], v), k
    opt_state = expert.optimizer.state_dict()
    assert last.optimizer_state["param_groups"] == opt_state["param_groups"]
    assert last.optimizer_state["state"].keys() == opt_state["state"].keys()
    for i, st in opt_state["state"].items():
        assert torch.equal(last.optimizer_state["state"][i]["momentum_buffer"], st["momentum_buffer"])
    # step 0 has no momentum yet; later checkpoints differ from it
    assert traj[0].optimizer_state["state"] == {}
    assert not torch.equal(traj[0].model_state["0.weight"], traj[1].model_state["0.weight"])

    # the checkpoint loads into a fresh model and optimizer
    model = _bn_net(1, NUM_CLASSES)
    model.load_state_dict(last.model_state)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    opt.load_state_dict(last.optimizer_state)
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["nesterov"]

    assert [c.step for c in load_trajectory(tmp_path, fraction=(0.2, 0.6))] == [4, 8]
    with pytest.raises(ValueError, match="already holds"):
        train_expert(lambda: _bn_net(1, NUM_CLASSES), x, y, _sine(), 1, 2,
                     _settings(), tmp_path, torch.Generator().manual_seed(0))


def test_small_dataset_and_explicit_copies(tmp_path):
    x, y = _xy(10)  # fewer items than one batch
    expert = train_expert(lambda: _bn_net(1, NUM_CLASSES), x, y, _sine(), -1, 0,
                          _settings(epochs=2, n_poison_copies=25, checkpoint_every=1000),
                          tmp_path, torch.Generator().manual_seed(0))
    # 10 + 25 = 35 items -> 3 steps per epoch
    assert expert.checkpoint_steps == [0, 6]
    clean = train_expert(lambda: _bn_net(1, NUM_CLASSES), x, y, _sine(), 1, 0,
                         _settings(epochs=1, n_poison_copies=0), tmp_path / "clean",
                         torch.Generator().manual_seed(0))
    assert clean.checkpoint_steps == [0, 1]


def test_poison_copies_and_poisoned_batch():
    y = torch.tensor([0, 1, 1, 2, 1, 0])
    g = torch.Generator().manual_seed(0)
    src = poison_source_indices(y, 1, 2, 2, g)
    assert len(src) == 2 and set(src.tolist()) <= {1, 2, 4} and len(set(src.tolist())) == 2
    many = poison_source_indices(y, 1, 2, 7, g)
    assert sorted(many.tolist()).count(1) >= 2 and set(many.tolist()) == {1, 2, 4}
    assert set(poison_source_indices(y, -1, 2, 5, g).tolist()) == {0, 1, 2, 4, 5}
    with pytest.raises(ValueError):
        poison_source_indices(y, 3, 2, 1, g)

    x = torch.rand(6, 1, 4, 4) * 0.5
    data = PoisonedData(x, y, torch.tensor([4, 1]), lambda t: t + 0.25, target=2)
    xp, yp, xc, idx = data.batch(torch.tensor([0, 6, 7, 4]), AugmentSettings(enabled=False), g)
    assert idx.tolist() == [0, 4, 1, 4]
    assert yp.tolist() == [0, 2, 2, 1]
    assert torch.equal(xc, x[[0, 4, 1, 4]])
    assert torch.allclose(xp, x[[0, 4, 1, 4]] + torch.tensor([0, 0.25, 0.25, 0])[:, None, None, None])
