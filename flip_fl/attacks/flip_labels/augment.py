"""Paired data augmentation on image tensors.

FLIP needs the clean view and the triggered view of one image to get the *same* random crop and flip
(reference: "Clean/poisoned views of a pair share the same augmentation"), so the augmentation draws
its random parameters once per image and applies them to every view passed in.

The crop matches `torchvision.transforms.RandomCrop(size, padding=p)` (zero padding, uniform offset
in `[0, 2p]`) and the flip matches `RandomHorizontalFlip(0.5)`. Random numbers come from a CPU
`torch.Generator`; the views may live on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentSettings:
    """`enabled=False` turns augmentation off (synthetic / MNIST-like data)."""

    enabled: bool = True
    padding: int = 4
    hflip: bool = True


def paired_augment(
    views: tuple[Tensor, ...] | list[Tensor],
    settings: AugmentSettings,
    generator: torch.Generator,
) -> tuple[Tensor, ...]:
    """Augment every `N x C x H x W` tensor in `views` with the same per-image crop and flip.

    Returns new tensors (the inputs are not modified). With `settings.enabled` false the views are
    returned unchanged and no random numbers are drawn.
    """
    views = tuple(views)
    if not settings.enabled or not views:
        return views
    shape = views[0].shape
    if any(v.shape != shape for v in views):
        raise ValueError(f"paired views must share a shape, got {[tuple(v.shape) for v in views]}")
    n, _, h, w = shape
    device = views[0].device
    out = views

    p = settings.padding
    if p > 0:
        oy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(device)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(device)
        rows = (oy[:, None] + torch.arange(h, device=device))[:, :, None]  # n x h x 1
        cols = (ox[:, None] + torch.arange(w, device=device))[:, None, :]  # n x 1 x w
        idx = torch.arange(n, device=device)[:, None, None]
        # Advanced indices around a slice put the broadcast dims first: n x h x w x C.
        out = tuple(
            F.pad(v, (p, p, p, p))[idx, :, rows, cols].permute(0, 3, 1, 2).contiguous() for v in out
        )
    if settings.hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(device)[:, None, None, None]
        out = tuple(torch.where(flip, v.flip(-1), v) for v in out)
    return out


def augment(x: Tensor, settings: AugmentSettings, generator: torch.Generator) -> Tensor:
    """Single-view convenience wrapper around `paired_augment`."""
    return paired_augment((x,), settings, generator)[0]
