"""The FLIP label-only backdoor attack (Jha, Hayase, Oh; NeurIPS 2023), torch-level core.

Not the FLIP defense (Zhang et al., ICLR 2023, `flip_fl.defenses.flip_defense`). The attacker changes labels only:
it picks which training labels to flip so that a model trained on them learns a trigger it never saw.
`stages` runs experts and label matching on an attacker's own data (`clients.FlipLabelClient`, the
label-only poisoner in a federation); `flip_fl.experiments.labels_pipeline` runs every step as resumable
stages (`sim.py labels`).

Pipeline on plain tensors (`x`: N x C x H x W in [0, 1], `y`: N int64):

1. `train_expert` (x `load_trajectory`): train on clean + triggered source copies,
   record model and optimizer state;
2. `optimize_labels`: trajectory matching on per-image logits;
3. `flip_labels_at_budgets` / `select_flips` (baselines `random_flips`,
   `matched_random_flips`);
4. `train_user_model` on the flipped hard labels (or `soft_labels`), then
   `evaluate_cta_pta`.
"""

from flip_fl.training import soft_cross_entropy

from .augment import AugmentSettings, augment, paired_augment
from .common import TrainSettings
from .experts import Checkpoint, Expert, ExpertSettings, checkpoint_steps, load_trajectory, train_expert
from .flips import (
    aggregate_margins,
    apply_flips,
    flip_labels_at_budgets,
    margins,
    matched_random_flips,
    random_flips,
    resolve_budget,
    select_flips,
)
from .matching import (
    MatchSettings,
    SGDHyper,
    momentum_buffers,
    optimize_labels,
    sgd_step_functional,
)
from .user import LabelScores, UserSettings, evaluate_cta_pta, predict, soft_labels, train_user_model

__all__ = [
    "AugmentSettings", "augment", "paired_augment",
    "TrainSettings", "soft_cross_entropy",
    "Checkpoint", "Expert", "ExpertSettings", "checkpoint_steps", "load_trajectory", "train_expert",
    "aggregate_margins", "apply_flips", "flip_labels_at_budgets", "margins", "matched_random_flips",
    "random_flips", "resolve_budget", "select_flips",
    "MatchSettings", "SGDHyper", "momentum_buffers", "optimize_labels", "sgd_step_functional",
    "LabelScores", "UserSettings", "evaluate_cta_pta", "predict", "soft_labels", "train_user_model",
]
