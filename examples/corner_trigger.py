"""A user backdoor trigger: a bright square in the top-left corner.

Nothing to register: name the class by its dotted path, with this folder on PYTHONPATH; its keyword
arguments come from `attack.trigger_args`:

    PYTHONPATH=examples python sim.py --config configs/quickstart.yaml \
        --set attack.trigger=corner_trigger.CornerTrigger --set attack.trigger_args.size=4
"""

from __future__ import annotations

import torch
from torch import Tensor

from flip_fl.attacks.triggers import Trigger


class CornerTrigger(Trigger):
    """A `size` x `size` square of `value` (every channel) whose top-left pixel is the image's.

    Args:
        image_shape: `(C, H, W)` of the images it stamps.
        size: the square's side in pixels.
        value: the pixels' value, in [0, 1].
    """

    name = "corner"

    def __init__(self, image_shape: tuple[int, int, int], size: int = 3, value: float = 1.0) -> None:
        super().__init__(image_shape)
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(f"corner: size must be an integer, got {size!r}")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"corner: value must be in [0, 1], got {value!r}")
        self._check_box("square", 0, 0, size, size)  # a ValueError when it does not fit the image
        self.size, self.value = size, float(value)

    def _mask(self, piece: int | None) -> Tensor:
        mask = torch.zeros(self.image_shape[1:], dtype=torch.bool)
        mask[: self.size, : self.size] = True
        return mask

    def _stamp(self, x: Tensor, piece: int | None) -> Tensor:
        out = x.clone()  # never modify the input
        out[:, :, : self.size, : self.size] = self.value
        return out
