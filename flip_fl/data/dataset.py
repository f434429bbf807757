"""`ImageDataset`: uint8 images N x C x H x W with int64 labels and per-channel statistics.

`ImageDataset.batch` returns float images in [0, 1]; models normalise inside, so triggers are stamped in
pixel space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageDataset:
    """Images (uint8, N x C x H x W) with labels (int64, N) and per-channel statistics."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def batch(self, index: torch.Tensor | np.ndarray | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and labels at `index`."""
        if isinstance(index, np.ndarray):
            index = torch.from_numpy(index)
        return self.images[index].float().div_(255.0), self.labels[index]

    def subset(self, index: np.ndarray) -> ImageDataset:
        """The samples at `index`, as a new dataset sharing the statistics."""
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
        return ImageDataset(self.images[idx], self.labels[idx], self.num_classes, self.mean, self.std)
