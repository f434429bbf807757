"""The model architectures, registered by name (`flip_fl.registry.MODELS`), and one factory (`create_model`).

Every model takes images in [0, 1] and normalises them inside (non-persistent buffers, so the
statistics are not part of the state_dict and never aggregated), so triggers live in pixel space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flip_fl.config import ModelConfig
from flip_fl.data.dataset import ImageDataset
from flip_fl.registry import MODELS


class Normalize(nn.Module):
    """Per-channel (x - mean) / std with the statistics kept out of the state_dict."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch of images in [0, 1]."""
        return (x - self.mean) / self.std


class _TwoConvNet(nn.Module):
    """conv-ReLU-pool, conv-ReLU-pool, fc-ReLU, fc: the layout shared by TinyCNN and MnistCNN."""

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, fc1: nn.Linear, fc2: nn.Linear) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc1, self.fc2 = conv1, conv2, fc1, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@MODELS.register("tiny_cnn")
class TinyCNN(_TwoConvNet):
    """Two 3x3 conv layers and a small classifier: fast enough for CPU tests and quickstarts."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__(nn.Conv2d(in_channels, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1),
                         nn.Linear(32 * (image_size // 4) ** 2, 64), nn.Linear(64, num_classes))


@MODELS.register("mnist_cnn")
class MnistCNN(_TwoConvNet):
    """conv(1->20,5)-pool-conv(20->50,5)-pool-fc(800->500)-fc(500->10), as in the FLIP defense code."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        side = ((image_size - 4) // 2 - 4) // 2
        super().__init__(nn.Conv2d(in_channels, 20, 5), nn.Conv2d(20, 50, 5), nn.Linear(50 * side * side, 500),
                         nn.Linear(500, num_classes))


class BasicBlock(nn.Module):
    """3x3-3x3 residual block with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, no max-pool, BasicBlock stages, global average pool."""

    def __init__(self, num_classes: int, in_channels: int, widths: Sequence[int], depths: Sequence[int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            for j in range(depth):
                layers.append(BasicBlock(in_planes, width, 2 if (j == 0 and i > 0) else 1))
                in_planes = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images."""
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@MODELS.register("resnet18")
def _resnet18(num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> nn.Module:
    widths = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
    return CifarResNet(num_classes, in_channels, widths, [2, 2, 2, 2])


@MODELS.register("resnet32")
def _resnet32(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return CifarResNet(num_classes, in_channels, [16, 32, 64], [5, 5, 5])


def create_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 **options: object) -> nn.Module:
    """Build model `name` behind a Normalize layer (identity statistics when none are given).

    `options` pass through to the architecture (e.g. `width` for resnet18).
    """
    net = MODELS.lookup(name)(num_classes, in_channels, image_size, **options)
    mean = [0.0] * in_channels if mean is None else list(mean)
    std = [1.0] * in_channels if std is None else list(std)
    return nn.Sequential(Normalize(mean, std), net)


def build_model(model_cfg: ModelConfig, data: ImageDataset) -> nn.Module:
    """The configured model, shaped and normalised for `data`."""
    options = {"width": model_cfg.width} if model_cfg.name == "resnet18" else {}
    channels, size, _ = data.image_shape
    return create_model(model_cfg.name, data.num_classes, channels, size, data.mean, data.std, **options)
