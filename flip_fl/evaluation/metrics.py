"""Thresholded-inference metrics (low-confidence rejection), as pure functions of probabilities.

With threshold tau, a prediction is accepted when its max softmax probability is >= tau. Following the
FLIP defense paper, a rejected sample counts as wrong (clean accuracy) and as no attack success (ASR),
and stays in the denominators. tau = 0 accepts everything, so thresholded values equal the plain ones.
"""

from __future__ import annotations

import torch


def clean_metrics(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float | None]:
    """Accuracy with and without rejection, rejection rate and accuracy on the accepted samples."""
    conf, pred = probs.max(dim=1)
    correct = pred == labels
    accepted = conf >= threshold
    n, n_accepted = len(labels), int(accepted.sum())
    return {
        "clean_acc": float(correct.float().mean()) if n else 0.0,
        "clean_acc_thresholded": float((correct & accepted).float().mean()) if n else 0.0,
        "clean_reject_rate": float((~accepted).float().mean()) if n else 0.0,
        "clean_acc_accepted": float((correct & accepted).sum()) / n_accepted if n_accepted else None,
    }


def backdoor_metrics(probs: torch.Tensor, target: int, threshold: float) -> dict[str, float]:
    """Attack success on triggered inputs (true label != target) with and without rejection."""
    conf, pred = probs.max(dim=1)
    success = pred == target
    accepted = conf >= threshold
    n = len(pred)
    return {
        "asr": float(success.float().mean()) if n else 0.0,
        "asr_thresholded": float((success & accepted).float().mean()) if n else 0.0,
        "backdoor_reject_rate": float((~accepted).float().mean()) if n else 0.0,
    }


def cross_entropy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true labels under `probs`."""
    picked = probs.gather(1, labels.view(-1, 1)).clamp_min(1e-12)
    return float(-picked.log().mean()) if len(labels) else 0.0


def threshold_sweep(clean_probs: torch.Tensor, labels: torch.Tensor, triggered_probs: torch.Tensor, target: int,
                    thresholds: list[float]) -> list[dict[str, float | None]]:
    """Coverage/accuracy trade-off on clean and triggered data for each threshold (one row each)."""
    rows = []
    for tau in thresholds:
        clean = clean_metrics(clean_probs, labels, tau)
        attack = backdoor_metrics(triggered_probs, target, tau)
        rejected = clean["clean_reject_rate"]
        assert rejected is not None  # a rate, never undefined
        rows.append({"threshold": tau, "clean_coverage": 1.0 - rejected,
                     "clean_acc_thresholded": clean["clean_acc_thresholded"],
                     "clean_acc_accepted": clean["clean_acc_accepted"],
                     "backdoor_coverage": 1.0 - attack["backdoor_reject_rate"],
                     "asr_thresholded": attack["asr_thresholded"]})
    return rows
