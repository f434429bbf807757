"""Where datasets come from: the built-in synthetic data, scikit-learn's digits and torchvision, by `data.name`.

Loaders are registered in `flip_fl.registry.DATASETS` with their class count (`num_classes`).

Every dataset is held as uint8 images N x C x H x W plus int64 labels (`ImageDataset`).
Clients load their partition locally through the cached `load_datasets` (never through messages).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flip_fl.config import Config, ConfigError
from flip_fl.data.dataset import ImageDataset
from flip_fl.registry import DATASETS
from flip_fl.seeds import DIGITS_SPLIT, numpy_rng, synthetic_data_seed


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def make_synthetic(seed: int, channels: int, image_size: int, train_size: int, test_size: int,
                   noise: float, num_classes: int = 10) -> tuple[ImageDataset, ImageDataset]:
    """A deterministic, learnable-but-not-trivial 10-class image dataset for offline runs and tests.

    Each class has a smooth random prototype (a 7x7 random field upsampled to the image size).
    A sample blends its class prototype with a random other class's prototype (weight up to 0.45),
    is shifted by up to 2 pixels, rescaled in contrast and brightness, and gets Gaussian pixel noise.
    A small CNN learns it to > 90% in a few epochs; nearest-prototype matching does clearly worse.
    """
    gen = torch.Generator().manual_seed(synthetic_data_seed(seed))
    low = torch.rand(num_classes, channels, 7, 7, generator=gen)
    protos = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    protos = (protos - protos.amin(dim=(1, 2, 3), keepdim=True)) / (
        protos.amax(dim=(1, 2, 3), keepdim=True) - protos.amin(dim=(1, 2, 3), keepdim=True))

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=gen)]
        other = (y + torch.randint(1, num_classes, (n,), generator=gen)) % num_classes
        w = 0.45 * torch.rand(n, 1, 1, 1, generator=gen)
        x = (1 - w) * protos[y] + w * protos[other]
        shifts = torch.randint(-2, 3, (n, 2), generator=gen)
        x = torch.stack([torch.roll(img, shifts=(int(s[0]), int(s[1])), dims=(1, 2)) for img, s in zip(x, shifts)])
        contrast = 0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)
        bright = 0.1 * torch.randn(n, 1, 1, 1, generator=gen)
        x = 0.5 + contrast * (x - 0.5) + bright + noise * torch.randn(x.shape, generator=gen)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y.to(torch.int64)

    x_train, y_train = draw(train_size)
    x_test, y_test = draw(test_size)
    mean, std = _channel_stats(x_train)
    return (ImageDataset(x_train, y_train, num_classes, mean, std),
            ImageDataset(x_test, y_test, num_classes, mean, std))


@dataclass(frozen=True)
class TorchvisionSpec:
    """How to read one torchvision dataset and normalise it."""

    cls_name: str
    folder: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


TORCHVISION = {
    "mnist": TorchvisionSpec("MNIST", "MNIST/raw", 10, (0.1307,), (0.3081,)),
    "fashion_mnist": TorchvisionSpec("FashionMNIST", "FashionMNIST/raw", 10, (0.2860,), (0.3530,)),
    "cifar10": TorchvisionSpec("CIFAR10", "cifar-10-batches-py", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": TorchvisionSpec("CIFAR100", "cifar-100-python", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def load_torchvision(name: str, root: str, download: bool) -> tuple[ImageDataset, ImageDataset]:
    """Train and test splits of a torchvision dataset read from `root` (downloaded only if allowed)."""
    import torchvision  # imported here: synthetic runs do not pay for it

    spec = TORCHVISION[name]
    cls = getattr(torchvision.datasets, spec.cls_name)
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=root, train=train, download=download)
        except RuntimeError as err:
            expected = Path(root).resolve() / spec.folder
            raise ConfigError(
                f"data.root: no {name} files found at {expected} ({err}); copy the dataset there "
                f"or set data.download: true on a machine with internet access") from None
        images = torch.as_tensor(np.asarray(ds.data))
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
        splits.append(ImageDataset(images.contiguous(), labels, spec.num_classes, spec.mean, spec.std))
    return splits[0], splits[1]


@DATASETS.register("synthetic", num_classes=10)
def _synthetic(cfg: Config) -> tuple[ImageDataset, ImageDataset]:
    syn = cfg.data.synthetic
    return make_synthetic(cfg.seed, syn.channels, syn.image_size, syn.train_size, syn.test_size, syn.noise)


DIGITS_TEST_FRACTION = 0.2


def load_digits(seed: int, test_fraction: float = DIGITS_TEST_FRACTION) -> tuple[ImageDataset, ImageDataset]:
    """scikit-learn's bundled UCI handwritten digits (1,797 images) in MNIST's 28x28 framing: real, offline.

    The 8x8 images (values 0..16) are scaled to [0, 1], upsampled bilinearly to 20x20 and centred in a
    28x28 field with a 4-pixel empty border, as MNIST centres its digits in a 20x20 box, so corner
    triggers (DBA, pixel patterns) land on background as on MNIST. The split is stratified and seeded:
    `test_fraction` of every class (rounded) goes to the test set (1,438 train / 359 test images).
    """
    from sklearn.datasets import load_digits as sklearn_digits  # imported here: only this dataset needs it

    bunch = sklearn_digits()
    small = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.pad(F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    rng = numpy_rng(seed, DIGITS_SPLIT)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        members = rng.permutation(np.flatnonzero(bunch.target == c))
        is_test[members[: int(round(test_fraction * len(members)))]] = True
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    mean, std = _channel_stats(images[train_idx])
    return (ImageDataset(images[train_idx], labels[train_idx], 10, mean, std),
            ImageDataset(images[test_idx], labels[test_idx], 10, mean, std))


@DATASETS.register("digits", num_classes=10)
def _digits(cfg: Config) -> tuple[ImageDataset, ImageDataset]:
    return load_digits(cfg.seed)


def _torchvision_loader(name: str) -> Callable[[Config], tuple[ImageDataset, ImageDataset]]:
    def load(cfg: Config) -> tuple[ImageDataset, ImageDataset]:
        return load_torchvision(name, cfg.data.root, cfg.data.download)
    return load


for _name, _spec in TORCHVISION.items():  # the same decorator, once per torchvision dataset
    DATASETS.register(_name, num_classes=_spec.num_classes)(_torchvision_loader(_name))


def _data_key(cfg: Config) -> tuple:
    syn = cfg.data.synthetic
    return (cfg.data.name, cfg.data.root, cfg.seed if cfg.data.name in ("synthetic", "digits") else None,
            syn.channels, syn.image_size, syn.train_size, syn.test_size, syn.noise)


class DataKey:
    """Hashable wrapper: caches by the data-relevant keys only, carries the full config."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.key = cfg, _data_key(cfg)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataKey) and self.key == other.key


@functools.lru_cache(maxsize=2)
def load_keyed(keyed: DataKey) -> tuple[ImageDataset, ImageDataset]:
    return DATASETS.lookup(keyed.cfg.data.name)(keyed.cfg)


def load_datasets(cfg: Config) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) for the configured dataset, cached per process."""
    return load_keyed(DataKey(cfg))
