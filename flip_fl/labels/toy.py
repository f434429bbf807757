"""Synthetic data, a tiny BatchNorm CNN and a stripe trigger, for tests and CPU smoke runs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def prototype_dataset(
    n: int,
    num_classes: int = 10,
    shape: tuple[int, int, int] = (1, 16, 16),
    noise: float = 0.25,
    generator: torch.Generator | None = None,
    prototypes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, y, prototypes)``: balanced classes of smooth random prototypes plus Gaussian noise,
    clipped to [0, 1]. Pass the returned ``prototypes`` back in to draw a test set."""
    if prototypes is None:
        coarse = torch.rand((num_classes, shape[0], 4, 4), generator=generator)
        prototypes = F.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    y = torch.arange(n) % prototypes.shape[0]
    y = y[torch.randperm(n, generator=generator)]
    x = prototypes[y] + noise * torch.randn((n, *shape), generator=generator)
    return x.clamp(0, 1), y, prototypes


class TinyCNN(nn.Sequential):
    """conv-BN-ReLU-pool x2, linear. A few thousand parameters."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8):
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, num_classes),
        )


def stripe_trigger(amplitude: float = 6 / 255, periods: float = 8.0):
    """Sinusoidal trigger (FLIP "s"): ``amplitude * sin(linspace(0, 2*pi*periods, W))`` added to
    every pixel column, clipped to [0, 1]. CIFAR's "s" is ``amplitude=6/255, periods=8``."""

    def apply(x: Tensor) -> Tensor:
        w = x.shape[-1]
        wave = amplitude * torch.sin(torch.linspace(0, 2 * math.pi * periods, w, device=x.device))
        return (x + wave.to(x.dtype)).clamp(0, 1)

    return apply
