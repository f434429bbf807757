"""Synthetic data, real-loader errors and partitioning."""

import numpy as np
import pytest
import torch

from flip_fl.config import ConfigError
from flip_fl.data import load_torchvision, make_synthetic, partition_dirichlet, partition_iid


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_synthetic_shapes_and_determinism(channels, size):
    train, test = make_synthetic(3, channels, size, 500, 100, 0.2)
    again, _ = make_synthetic(3, channels, size, 500, 100, 0.2)
    other, _ = make_synthetic(4, channels, size, 500, 100, 0.2)
    assert train.images.shape == (500, channels, size, size) and train.images.dtype == torch.uint8
    assert len(test) == 100 and train.num_classes == 10
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.images, other.images)
    assert sorted(torch.bincount(train.labels).tolist()) == [50] * 10
    x, _ = train.batch(np.arange(4))
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_synthetic_is_not_trivially_separable():
    """Nearest class mean on raw pixels stays well below what a CNN reaches (> 0.9)."""
    train, test = make_synthetic(0, 1, 28, 2000, 500, 0.2)
    xtr, ytr = train.batch(np.arange(len(train)))
    xte, yte = test.batch(np.arange(len(test)))
    means = torch.stack([xtr[ytr == c].mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(xte.flatten(1), means).argmin(1)
    accuracy = float((pred == yte).float().mean())
    assert 0.2 < accuracy < 0.85


def test_missing_torchvision_files_name_the_root(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_torchvision("mnist", str(tmp_path), download=False)
    message = str(info.value)
    assert message.startswith("data.root: no mnist files found at") and str(tmp_path) in message
    assert "data.download: true" in message


def test_iid_partition_sizes_and_determinism():
    parts = partition_iid(103, 10, seed=1)
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(103, 10, seed=1)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(103, 10, seed=2)))


def test_dirichlet_partition_covers_all_and_is_skewed():
    labels = np.repeat(np.arange(10), 200)
    skewed = partition_dirichlet(labels, 20, alpha=0.1, seed=0)
    uniform = partition_dirichlet(labels, 20, alpha=1000.0, seed=0)
    assert np.array_equal(np.sort(np.concatenate(skewed)), np.arange(2000))
    assert all(len(p) >= 1 for p in skewed)

    def mean_max_share(parts):
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert mean_max_share(skewed) > 0.5 > 0.2 > mean_max_share(uniform)
    again = partition_dirichlet(labels, 20, alpha=0.1, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, again))


def test_digits_are_real_handwritten_digits_in_mnist_framing_with_a_seeded_stratified_split():
    from sklearn.datasets import load_digits as sklearn_digits

    from flip_fl.data.sources import load_digits

    train, test = load_digits(0)
    assert (len(train), len(test)) == (1438, 359) and train.image_shape == (1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.num_classes == 10
    counts = torch.bincount(test.labels, minlength=10)
    raw = np.bincount(sklearn_digits().target, minlength=10)
    assert counts.tolist() == [int(round(0.2 * n)) for n in raw]  # 20% of every class
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert int(train.images[:, 0][:, border].max()) == 0  # MNIST framing: the digit sits in the central 20x20
    assert float(train.images.float().mean()) > 20  # and the images are not empty
    again, _ = load_digits(0)
    other, _ = load_digits(1)
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.labels, other.labels)  # the split follows the seed
    assert set(map(bytes, train.images.numpy())).isdisjoint(map(bytes, test.images.numpy()[:50]))
