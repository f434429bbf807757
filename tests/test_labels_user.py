import pytest
import torch
from torch import nn

from flip_fl.labels import AugmentSettings, TrainSettings, evaluate_cta_pta, soft_labels, train_user_model
from flip_fl.labels.toy import TinyCNN, prototype_dataset, stripe_trigger


class _Const(nn.Module):
    """Predicts class 0 for clean images and class 2 for images whose mean exceeds 0.6."""

    def forward(self, x):
        bright = (x.mean(dim=(1, 2, 3)) > 0.6).float()
        out = torch.zeros(len(x), 3)
        out[:, 0] = 1 - bright
        out[:, 2] = bright
        return out


def test_evaluate_cta_pta():
    x = torch.full((6, 1, 2, 2), 0.5)
    y = torch.tensor([0, 0, 1, 2, 1, 0])
    trig = lambda t: t + 0.2  # noqa: E731
    cta, pta = evaluate_cta_pta(_Const(), x, y, trig, 1, 2)
    assert cta == pytest.approx(3 / 6) and pta == 1.0
    cta, pta = evaluate_cta_pta(_Const(), x, y, lambda t: t, -1, 2)
    assert pta == 0.0
    # source -1: every non-target image (5 of them); only the first two get the trigger
    stamped_first = lambda t: torch.cat([t[:2] + 0.2, t[2:]])  # noqa: E731
    _, pta = evaluate_cta_pta(_Const(), x, y, stamped_first, -1, 2, batch_size=100)
    assert pta == pytest.approx(2 / 5)


def test_soft_labels():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 2])
    s = soft_labels(logits, y, 0.5)
    assert torch.allclose(s.sum(1), torch.ones(2))
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(s, torch.softmax(0.5 * one_hot + 0.5 * logits, dim=1))
    assert torch.allclose(soft_labels(logits, y, 1.0), torch.softmax(one_hot, dim=1))


def test_train_user_model_hard_and_soft():
    g = torch.Generator().manual_seed(0)
    x, y, protos = prototype_dataset(200, 3, (1, 8, 8), noise=0.1, generator=g)
    xt, yt, _ = prototype_dataset(90, 3, (1, 8, 8), noise=0.1, generator=g, prototypes=protos)
    settings = TrainSettings(epochs=5, batch_size=32, lr=0.05, augment=AugmentSettings(enabled=False))
    model = train_user_model(lambda: TinyCNN(1, 3, 4), x, y, settings, g)
    assert not model.training
    cta, _ = evaluate_cta_pta(model, xt, yt, stripe_trigger(), 0, 1)
    assert cta > 0.9
    soft = soft_labels(5 * torch.nn.functional.one_hot(y, 3).float(), y, 0.5)
    model = train_user_model(lambda: TinyCNN(1, 3, 4), x, soft, settings, g)
    assert evaluate_cta_pta(model, xt, yt, stripe_trigger(), 0, 1)[0] > 0.9


def test_train_user_model_rejects_ambiguous_targets():
    x = torch.rand(8, 1, 4, 4)
    s = TrainSettings(epochs=1)
    with pytest.raises(ValueError):
        train_user_model(lambda: TinyCNN(1, 3, 4), x, torch.randn(8, 3), s, torch.Generator())
    with pytest.raises(ValueError):
        train_user_model(lambda: TinyCNN(1, 3, 4), x, torch.zeros(8, dtype=torch.int32), s,
                         torch.Generator())
