"""Model registry shapes and thresholded metrics against hand-computed values."""

import pytest
import torch

from flip_fl.evaluation.metrics import backdoor_metrics, clean_metrics, threshold_sweep
from flip_fl.models import create_model


@pytest.mark.parametrize("name, channels, size, options", [
    ("tiny_cnn", 1, 28, {}), ("tiny_cnn", 3, 32, {}), ("mnist_cnn", 1, 28, {}), ("mnist_cnn", 3, 32, {}),
    ("resnet18", 3, 32, {"width": 0.5}), ("resnet32", 3, 32, {}),
])
def test_model_output_shapes(name, channels, size, options):
    model = create_model(name, 10, channels, size, **options)
    assert model(torch.rand(2, channels, size, size)).shape == (2, 10)
    assert not any(k.endswith(("mean", "std")) and "bn" not in k and "shortcut" not in k
                   for k in model.state_dict() if k.startswith("0."))


def test_mnist_cnn_matches_the_flip_architecture():
    net = create_model("mnist_cnn")[1]
    assert (net.conv1.out_channels, net.conv2.out_channels) == (20, 50)
    assert (net.fc1.in_features, net.fc1.out_features) == (800, 500)


def test_half_width_resnet18_has_quarter_parameters():
    full = sum(p.numel() for p in create_model("resnet18", 10, 3, 32).parameters())
    half = sum(p.numel() for p in create_model("resnet18", 10, 3, 32, width=0.5).parameters())
    assert 0.2 < half / full < 0.3


def test_unknown_model_is_rejected():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        create_model("vgg")


def test_thresholded_metrics_hand_example():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 0])
    m = clean_metrics(probs, labels, threshold=0.65)
    # predictions 0,0,1,1 -> correct T,F,T,F; accepted (conf>=0.65) T,F,T,F
    assert m["clean_acc"] == 0.5 and m["clean_acc_thresholded"] == 0.5
    assert m["clean_reject_rate"] == 0.5 and m["clean_acc_accepted"] == 1.0
    b = backdoor_metrics(probs, target=1, threshold=0.6)
    # predicted target on rows 2,3; row 3 (0.55) rejected
    assert b == {"asr": 0.5, "asr_thresholded": 0.25, "backdoor_reject_rate": 0.25}
    assert backdoor_metrics(probs, 1, 0.0)["asr_thresholded"] == b["asr"]


def test_threshold_sweep_is_monotone():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(200, 10) * 3, 1)
    labels = torch.randint(0, 10, (200,))
    rows = threshold_sweep(probs, labels, probs, 2, [0.0, 0.3, 0.6, 0.9])
    coverage = [r["clean_coverage"] for r in rows]
    assert coverage[0] == 1.0 and coverage == sorted(coverage, reverse=True)
