"""Where tensors are computed: the one rule for choosing CUDA."""

from __future__ import annotations

import torch


def torch_device(num_gpus: float) -> torch.device:
    """CUDA when GPUs are requested (`resources.num_gpus` > 0) and available, else the CPU."""
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")
