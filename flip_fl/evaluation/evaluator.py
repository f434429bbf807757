"""Server-side evaluation of the global model.

Clean accuracy and loss, attack success rate, thresholded (low-confidence rejection) variants, and
per-piece ASR for distributed triggers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flip_fl.attacks.triggers import build_trigger
from flip_fl.config import Config, ConfigError
from flip_fl.data.dataset import ImageDataset
from flip_fl.evaluation.metrics import backdoor_metrics, clean_metrics, cross_entropy, threshold_sweep
from flip_fl.seeds import VALIDATION, numpy_rng
from flip_fl.training import predict_probs


def validation_split(cfg: Config, test: ImageDataset) -> tuple[ImageDataset | None, ImageDataset]:
    """(validation, test): `server.validation_size` test images drawn with the seed, and the rest.

    Choosing tau on the images that also report the final accuracy would flatter it; the validation split
    is for choosing, the rest for reporting. Without a split (size 0) the validation part is None.
    """
    k = cfg.server.validation_size
    if k == 0:
        return None, test
    if k >= len(test):
        raise ConfigError(f"server.validation_size: {k} validation images cannot be held out of {len(test)} "
                          "evaluation images")
    order = numpy_rng(cfg.seed, VALIDATION).permutation(len(test))
    return test.subset(np.sort(order[:k])), test.subset(np.sort(order[k:]))


class GlobalEvaluator:
    """Evaluates a global model on the clean test set and on triggered test images.

    The ASR set is every test image whose true label differs from the target (or, with
    `attack.source_label`, every test image of that class), stamped with the full trigger (the
    union of all pieces for DBA); each piece alone is also measured for DBA. `asr_no_trigger` is
    the ASR on those images unstamped: the part of the ASR that is class confusion, not a backdoor
    (label-flipping attacks raise it).
    """

    def __init__(self, cfg: Config, test: ImageDataset, device: torch.device) -> None:
        self.cfg, self.test, self.device = cfg, test, device
        self.target = cfg.attack.target_label
        self.threshold = cfg.defense.threshold
        self.trigger = build_trigger(cfg.attack, test.image_shape)
        source = cfg.attack.source_label
        victims = test.labels == source if source >= 0 else test.labels != self.target
        self.victim_ids = victims.nonzero().flatten()
        self.victims = test.subset(self.victim_ids.numpy())

    def _triggered_probs(self, model: nn.Module, piece: int | None) -> torch.Tensor:
        return predict_probs(model, self.victims, self.device, self.cfg.server.eval_batch_size,
                             transform=lambda x: self.trigger.apply(x, piece))

    def evaluate(self, model: nn.Module) -> dict[str, float | None]:
        """All per-round metrics of `model` (moved to the evaluation device)."""
        model = model.to(self.device)
        bs = self.cfg.server.eval_batch_size
        probs = predict_probs(model, self.test, self.device, bs)
        out: dict[str, float | None] = {**clean_metrics(probs, self.test.labels, self.threshold),
                                        "clean_loss": cross_entropy(probs, self.test.labels)}
        out.update(backdoor_metrics(self._triggered_probs(model, None), self.target, self.threshold))
        out["asr_no_trigger"] = backdoor_metrics(probs[self.victim_ids], self.target, 0.0)["asr"]
        if self.trigger.num_pieces > 1:
            for piece in range(self.trigger.num_pieces):
                probs_piece = self._triggered_probs(model, piece)
                out[f"asr_piece{piece}"] = backdoor_metrics(probs_piece, self.target, 0.0)["asr"]
        return out

    def sweep(self, model: nn.Module, thresholds: list[float]) -> list[dict[str, float | None]]:
        """Coverage vs accuracy on clean and triggered data over `thresholds`, for picking tau."""
        model = model.to(self.device)
        bs = self.cfg.server.eval_batch_size
        clean = predict_probs(model, self.test, self.device, bs)
        return threshold_sweep(clean, self.test.labels, self._triggered_probs(model, None), self.target, thresholds)
