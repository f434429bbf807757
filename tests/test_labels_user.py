import pytest
import torch
from torch import nn

from flip_fl.attacks.flip_labels import AugmentSettings, TrainSettings, evaluate_cta_pta, soft_labels, train_user_model
from flip_fl.attacks.triggers import create_trigger
from flip_fl.models import create_model


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
    scores = evaluate_cta_pta(_Const(), x, y, trig, 1, 2)
    assert scores.cta == pytest.approx(3 / 6) and scores.pta == 1.0 and scores.pta_clean == 0.0
    scores = evaluate_cta_pta(_Const(), x, y, lambda t: t, -1, 2)
    assert scores.pta == 0.0 and scores.pta_clean == 0.0
    # source -1: every non-target image (5 of them); only the first two get the trigger
    stamped_first = lambda t: torch.cat([t[:2] + 0.2, t[2:]])  # noqa: E731
    scores = evaluate_cta_pta(_Const(), x, y, stamped_first, -1, 2, batch_size=100)
    assert scores.pta == pytest.approx(2 / 5)


def test_pta_clean_counts_source_images_predicted_as_target_without_trigger():
    x = torch.tensor([0.5, 0.9, 0.9, 0.5, 0.9]).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    y = torch.tensor([1, 1, 1, 1, 0])  # images of class 1 at brightness 0.5, 0.9, 0.9, 0.5
    scores = evaluate_cta_pta(_Const(), x, y, lambda t: t + 0.4, 1, 2)
    # _Const predicts 2 when brightness > 0.6: two of four class-1 images clean, all four triggered
    assert scores.pta_clean == pytest.approx(2 / 4) and scores.pta == 1.0
    assert scores.cta == 0.0


def test_soft_labels():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 2])
    s = soft_labels(logits, y, 0.5)
    assert torch.allclose(s.sum(1), torch.ones(2))
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(s, torch.softmax(0.5 * one_hot + 0.5 * logits, dim=1))
    assert torch.allclose(soft_labels(logits, y, 1.0), torch.softmax(one_hot, dim=1))


def _brightness_classes(n: int, g: torch.Generator):
    """Three classes told apart by mean brightness: any working training loop learns them."""
    y = torch.arange(n) % 3
    return 0.1 + 0.35 * y[:, None, None, None] + 0.1 * torch.rand(n, 1, 8, 8, generator=g), y


def test_train_user_model_hard_and_soft():
    g = torch.Generator().manual_seed(0)
    (x, y), (xt, yt) = _brightness_classes(150, g), _brightness_classes(60, g)
    model_fn = lambda: create_model("tiny_cnn", 3, 1, 8)  # noqa: E731
    trigger = create_trigger("sinusoidal", (1, 8, 8)).apply
    settings = TrainSettings(epochs=10, batch_size=32, lr=0.1, augment=AugmentSettings(enabled=False))
    model = train_user_model(model_fn, x, y, settings, g)
    assert not model.training
    assert evaluate_cta_pta(model, xt, yt, trigger, 0, 1).cta > 0.9
    soft = soft_labels(5 * torch.nn.functional.one_hot(y, 3).float(), y, 0.5)
    model = train_user_model(model_fn, x, soft, settings, g)
    assert evaluate_cta_pta(model, xt, yt, trigger, 0, 1).cta > 0.9


def test_train_user_model_rejects_ambiguous_targets():
    x = torch.rand(8, 1, 4, 4)
    s = TrainSettings(epochs=1)
    model_fn = lambda: create_model("tiny_cnn", 3, 1, 4)  # noqa: E731
    with pytest.raises(ValueError):
        train_user_model(model_fn, x, torch.randn(8, 3), s, torch.Generator())
    with pytest.raises(ValueError):
        train_user_model(model_fn, x, torch.zeros(8, dtype=torch.int32), s,
                         torch.Generator())
