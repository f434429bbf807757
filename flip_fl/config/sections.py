"""The flip-fl configuration schema: every key, its type, default and meaning, in one place.

`docs/CONFIG.md` is generated from these sections (`python sim.py config-docs`) and a test keeps it current.
Load a file with `flip_fl.config.load_config(path, overrides)`; every problem raises `ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from flip_fl.config.schema import key, plugin_sections, section
from flip_fl.registry import DATASETS, DEFENSES, FLIP_SCHEDULES, MODELS, TRIGGERS


def client_class_key(default: str, role: str) -> Any:
    """A key naming a client class by dotted path."""
    return key(default, f"Dotted path of the {role} client class (must subclass flip_fl.federation.client.BaseClient).")


@dataclass
class SyntheticConfig:
    """data.synthetic: the built-in synthetic dataset."""

    channels: int = key(1, "Image channels of the synthetic dataset (1 or 3).", ge=1, le=3)
    image_size: int = key(28, "Height and width of the synthetic images (28 or 32 match MNIST/CIFAR).", ge=16, le=64)
    train_size: int = key(6000, "Number of synthetic training images.", ge=10)
    test_size: int = key(1000, "Number of synthetic test images.", ge=10)
    noise: float = key(0.2, "Std of the per-pixel Gaussian noise; higher is harder.", ge=0.0, le=1.0)


@dataclass
class DataConfig:
    """data: dataset and partitioning."""

    name: str = key(
        "synthetic",
        "Dataset: synthetic (offline, built in), digits (offline: scikit-learn's 1,797 real handwritten digits in "
        "28x28) or a torchvision dataset read from data.root.",
        family=DATASETS,
    )
    root: str = key("data", "Directory holding the torchvision dataset files (relative to the working directory).")
    download: bool = key(False, "Let torchvision download missing files into data.root (needs internet).")
    partition: Literal["iid", "dirichlet"] = key("iid", "How training data is split across clients.")
    alpha: float | None = key(None, "Dirichlet concentration; required when data.partition is dirichlet.", gt=0.0)
    synthetic: SyntheticConfig = section(SyntheticConfig, "Shape and difficulty of the synthetic dataset.")


@dataclass
class ModelConfig:
    """model: the architecture."""

    name: str = key("tiny_cnn", "Model architecture (flip_fl/models.py).", family=MODELS)
    width: float = key(1.0, "Width multiplier of resnet18 (the FLIP defense paper uses 0.5).", gt=0.0)


@dataclass
class FederationConfig:
    """federation: clients and rounds."""

    num_clients: int = key(20, "Number of clients (Flower supernodes), one data partition each.", ge=1)
    clients_per_round: int = key(10, "Clients sampled per round.", ge=1)
    num_rounds: int = key(5, "Federated rounds to run.", ge=1, le=2**63 - 1)


@dataclass
class RolesConfig:
    """roles: the client class of each role, by dotted path."""

    benign: str = client_class_key("clients.BenignClient", "benign")
    malicious: str = client_class_key("clients.PoisonClient", "malicious")


@dataclass
class TrainingConfig:
    """training: benign local training."""

    local_epochs: int = key(1, "Local epochs of benign training per round.", ge=1)
    batch_size: int = key(64, "Local minibatch size.", ge=1)
    lr: float = key(0.1, "Local SGD learning rate.", gt=0.0)
    momentum: float = key(0.9, "Local SGD momentum.", ge=0.0, lt=1.0)
    weight_decay: float = key(5e-4, "Local SGD weight decay.", ge=0.0)
    max_batches: int | None = key(None, "Cap on minibatches per round (null: no cap).", ge=1)


@dataclass
class ServerConfig:
    """server: aggregation and evaluation on the server."""

    lr: float = key(1.0, "Server learning rate eta: global += eta * mean(client deltas).", gt=0.0)
    weighted: bool = key(True, "Weight client deltas by their number of examples (false: plain mean).")
    initial_model: str | None = key(None, "Path of a state_dict (.pt) to start from, e.g. a clean run's "
                                          "final_model.pt.")
    eval_batch_size: int = key(512, "Batch size of server-side evaluation.", ge=1)
    validation_size: int = key(
        0,
        "Test images held out (seeded draw) as a validation split for choosing tau: threshold_sweep.csv is then "
        "computed on them as well, and every per-round metric on the remaining test images (0: no split).",
        ge=0,
    )
    min_clients: int | float = key(
        0.5,
        "Valid replies a round needs: a count (integer) or a fraction of the sampled clients (number in (0, 1]). A "
        "round with fewer (failed or rejected replies) fails the run instead of aggregating what is left.",
    )


@dataclass
class AttackConfig:
    """attack: malicious clients and their backdoor."""

    num_malicious: int = key(0, "Number of malicious clients, chosen by a seeded draw (0: no attack).", ge=0)
    malicious_ids: list[int] | None = key(
        None,
        "Explicit malicious partition ids (overrides the draw; its length must equal num_malicious or num_malicious "
        "must be 0).",
    )
    target_label: int = key(2, "Label the backdoor maps triggered inputs to.", ge=0)
    source_label: int = key(
        -1,
        "Class whose triggered images the backdoor targets (-1: every class but the target); ASR is measured on it, "
        "and the FLIP label attack poisons it.",
        ge=-1,
    )
    trigger: str = key(
        "pixel_pattern",
        "Backdoor trigger (flip_fl/attacks/triggers.py).",
        family=TRIGGERS,
    )
    trigger_args: dict[str, Any] = key({}, "Keyword arguments of the trigger (see flip_fl/attacks/triggers.py).")
    poison_fraction: float = key(
        0.3125,
        "Fraction of each malicious minibatch stamped and relabelled (20/64 as in the FLIP paper on MNIST).",
        gt=0.0,
        le=1.0,
    )
    mode: Literal["continuous", "single_shot"] = key(
        "continuous",
        "continuous: attack in every round of the window; single_shot: only in attack.rounds.",
    )
    start_round: int = key(1, "First round in which malicious clients attack.", ge=1)
    end_round: int | None = key(None, "Last attack round (null: until the end).", ge=1)
    rounds: list[int | list[int]] | None = key(
        None,
        "Per-attacker attack rounds: item i (a round or a list of rounds) is attacker i's schedule; null: start_round"
        " (single_shot) or the window (continuous).",
    )
    force_sampled: bool = key(
        True,
        "Put the attackers due to attack into the round's sample; the rest is drawn from benign clients.",
    )
    local_epochs: int | None = key(None, "Attacker local epochs (null: training.local_epochs).", ge=1)
    lr: float | None = key(None, "Attacker SGD learning rate (null: training.lr).", gt=0.0)
    momentum: float | None = key(None, "Attacker SGD momentum (null: training.momentum).", ge=0.0, lt=1.0)
    weight_decay: float | None = key(None, "Attacker SGD weight decay (null: training.weight_decay).", ge=0.0)
    lr_milestones: list[float] = key(
        [],
        "Fractions of the attacker's epochs at which its lr is multiplied by lr_gamma (the paper: [0.2, 0.8]).",
    )
    lr_gamma: float = key(0.1, "Attacker lr decay factor at each milestone.", gt=0.0)
    scale: float | Literal["auto"] = key(
        1.0,
        "Model-replacement factor gamma on the attacker's update; 'auto' = clients_per_round / server.lr (unweighted)"
        " so one update replaces the model.",
    )
    norm_bound: float | None = key(
        None,
        "L2 radius eps: the attacker's update is projected onto this ball (PGD, norm-bounded attack).",
        gt=0.0,
    )
    project_every: int = key(1, "Project onto the norm ball every k optimiser steps (and always at the end).", ge=1)
    neurotoxin_topk: float = key(
        5.0,
        "clients.NeurotoxinClient: percentage k of the coordinates, the largest of the benign direction, on which the "
        "attacker's gradient is zeroed (the Neurotoxin authors' commands: 5).",
        gt=0.0,
        lt=100.0,
    )
    lifespan_threshold: float = key(
        0.5,
        "summary.json's lifespan: rounds from the last attack round until the ASR first falls below this (Neurotoxin).",
        gt=0.0,
        le=1.0,
    )


@dataclass
class DefenseConfig:
    """defense: the server's defense, its parameters, and low-confidence rejection at evaluation."""

    name: str = key("fedavg", "Server defense (docs/DEFENSES.md); fedavg is no defense.", family=DEFENSES)
    threshold: float = key(
        0.0,
        "Low-confidence rejection tau at evaluation: predictions with max softmax < tau are rejected.",
        ge=0.0,
        lt=1.0,
    )
    params: dict[str, Any] = plugin_sections(
        DEFENSES, "name", "Each defense's parameters, under defense.<name> (e.g. defense.krum.num_malicious).")


@dataclass
class FastScheduleConfig:
    """The fast FLIP schedule (`flip_defense.schedule: fast`).

    One budgeted batched inversion per round, used by every batch.
    """

    budget: float = key(
        0.8,
        "Inversion work of a later selection, in image-gradients per image-gradient of the round's hardening: the "
        "inversion costs about this fraction of the hardening it feeds.",
        gt=0.0,
    )
    warmup_budget: float = key(
        2.0,
        "The same on a partition's first selection, which has no cached triggers to continue from.",
        gt=0.0,
    )
    min_steps: int = key(
        5,
        "Fewest inversion steps of a round, whatever the budget.",
        ge=1,
    )
    max_steps: int = key(
        100,
        "Most inversion steps of a round.",
        ge=1,
    )
    images_per_class: int = key(
        1,
        "Local images per class that the round's inversion uses (the same images every step).",
        ge=1,
    )
    pairs: int = key(
        4,
        "Known (source, target) pairs with the smallest triggers inverted each round beside the universal ones.",
        ge=0,
    )
    explore_pairs: int = key(
        1,
        "Random (source, target) pairs inverted each round (exploration).",
        ge=0,
    )
    stop_patience: int = key(
        10,
        "Every this many steps, end the inversion if every trigger has been found and none shrank by 1% since the "
        "last check (0: never).",
        ge=0,
    )
    inversion_lr: float = key(
        0.2,
        "Adam learning rate of the fast inversion (official: 0.1, tuned for runs of hundreds of steps).",
        gt=0.0,
    )
    init_cost: float = key(
        0.03,
        "Initial L1 weight of a trigger inverted for the first time; later rounds continue from the weight its "
        "last inversion ended with (official: 1e-3 every time).",
        ge=0.0,
    )
    cost_patience: int = key(
        3,
        "Steps at (below) the success threshold before the L1 weight is raised (lowered) (official: 10).",
        ge=1,
    )
    lr: float = key(
        0.03,
        "SGD learning rate of fast hardening, with training.momentum and training.weight_decay (the official "
        "schedule: Adam at flip_defense.lr; docs/FLIP.md, clean-accuracy drift).",
        gt=0.0,
    )


@dataclass
class FlipDefenseConfig:
    """FLIP defense on benign clients (clients.FlipDefenseClient).

    Defaults are the paper's MNIST values (docs/FLIP.md); keys marked official apply to the official schedule only.
    """

    harden: bool = key(
        True,
        "Invert triggers and harden against them; false: FlipDefenseClient trains exactly like BenignClient (the "
        "'without hardening' ablation).",
    )
    schedule: str = key(
        "fast",
        "official: the official code's per-batch schedule (warm-up, pair windows; minutes per client fit on a "
        "CPU); fast: one budgeted batched inversion per round whose triggers harden every batch (docs/FLIP.md).",
        family=FLIP_SCHEDULES,
    )
    warmup_steps: int = key(
        400,
        "official: steps of each universal inversion of the warm-up, one target per batch on a client's first "
        "selection (MNIST 400, F-MNIST 600, CIFAR-10 600).",
        ge=0,
    )
    size_min: int = key(
        1,
        "A class takes part in a batch's pair inversion when the batch has more than this many of its images "
        "(official: MNIST and F-MNIST 1, CIFAR-10 5).",
        ge=0,
    )
    samples_per_class: int = key(
        1,
        "official: local images per class of the warm-up's universal inversions (MNIST and F-MNIST 1, CIFAR-10 "
        "5).",
        ge=1,
    )
    pair_steps: int = key(
        200,
        "official: inversion steps on the first batch of a (source, target) pair, and on the next after a failure "
        "(MNIST 200, F-MNIST 400, CIFAR-10 200).",
        ge=1,
    )
    repeat_steps: int = key(
        50,
        "official: inversion steps on the next batch of the pair after a success, warm-started from its trigger "
        "(MNIST 50, F-MNIST 100, CIFAR-10 50).",
        ge=1,
    )
    repeat_cost: float = key(
        0.01,
        "official: initial L1 weight of those repeat inversions (all datasets 1e-2).",
        ge=0.0,
    )
    pair_every: int = key(
        2,
        "official: batches per selected pair after the first ten batches, which take a new pair each (all "
        "datasets 2).",
        ge=1,
    )
    explore: float = key(
        0.3,
        "official: probability of a random pair instead of the most promising one (smallest known trigger; all "
        "datasets 0.3).",
        ge=0.0,
        le=1.0,
    )
    symmetric: bool = key(
        True,
        "official: invert s->t and t->s together when both classes are in the batch (false: only s->t).",
    )
    init_cost: float = key(
        0.001,
        "official: initial weight of the mask L1 term of the inversion loss, adapted during the run (all datasets "
        "1e-3).",
        ge=0.0,
    )
    reinit_noise: float = key(
        0.01,
        "Each time an inversion improves its best trigger it restarts from it plus uniform noise of this "
        "half-width (official 0.01; 0: no restart).",
        ge=0.0,
    )
    success_threshold: float = key(
        0.9,
        "Fraction of stamped images classified as the target for an inverted trigger to count (MNIST and F-MNIST "
        "0.9, CIFAR-10 0.85).",
        gt=0.0,
        le=1.0,
    )
    max_mask_fraction: float = key(
        0.125,
        "Inverted triggers whose mask L1 exceeds this fraction of H*W are not stamped (MNIST and F-MNIST 1/8, "
        "CIFAR-10 1/4); the official warm-up stamps its universal triggers uncapped.",
        gt=0.0,
        le=1.0,
    )
    portion: float = key(
        0.5,
        "Fraction of the eligible images of a batch stamped with the inverted triggers, true labels kept (MNIST "
        "0.5, F-MNIST 0.6, CIFAR-10 0.9).",
        gt=0.0,
        le=1.0,
    )
    lr: float = key(
        0.01,
        "official: Adam learning rate of hardening, re-created every round (MNIST and F-MNIST 1e-2, CIFAR-10 "
        "1e-3).",
        gt=0.0,
    )
    betas: list[float] = key([0.5, 0.9], "official: Adam betas of hardening (all datasets [0.5, 0.9]).")
    local_epochs: int = key(
        10,
        "Local epochs of hardening (MNIST 10, F-MNIST 5, CIFAR-10 8), cut short by max_batches.",
        ge=1,
    )
    max_batches: int | None = key(
        110,
        "Cap on the batches a FLIP client goes through per round, trained or skipped (all datasets 110; null: no cap).",
        ge=1,
    )
    batch_size: int | None = key(
        None,
        "Hardening minibatch size (null: training.batch_size; the official code uses 64 MNIST, 128 F-MNIST and "
        "CIFAR-10).",
        ge=1,
    )
    max_cached_triggers: int = key(
        100,
        "Most pair triggers a client keeps across rounds (least recently inverted dropped first); universal ones are "
        "always kept.",
        ge=0,
    )
    fast: FastScheduleConfig = section(FastScheduleConfig, "The fast schedule (flip_defense.schedule: fast).")


@dataclass
class FlipLabelsConfig:
    """flip_labels: the FLIP label-only attack (Jha et al., NeurIPS 2023)."""

    num_experts: int = key(
        1,
        "Expert trajectories to train (the FLIP label paper uses up to 50; 1 gives most of the effect).",
        ge=1,
    )
    expert_epochs: int = key(20, "Epochs of each expert.", ge=1)
    expert_lr: float = key(0.1, "Expert SGD learning rate (Nesterov momentum 0.9).", gt=0.0)
    expert_weight_decay: float = key(2e-4, "Expert SGD weight decay.", ge=0.0)
    batch_size: int = key(256, "Minibatch size of experts, label matching and user models.", ge=1)
    checkpoint_every: int = key(50, "Save expert model and optimizer state every k minibatches.", ge=1)
    poison_copies: int | None = key(
        None,
        "Triggered source-class copies added to the expert's data (null: dataset size / classes).",
        ge=0,
    )
    augment: bool = key(True, "Random crop (pad 4) and horizontal flip in expert, matching and user training.")
    trajectory_fraction: list[float] = key(
        [0.0, 1.0],
        "Part [lo, hi] of each expert trajectory (fractions of its steps) used for matching.",
    )
    label_runs: int = key(
        1,
        "Independent label optimisations aggregated (worst-case margin) when selecting flips.",
        ge=1,
    )
    passes: int = key(15, "Passes over the data in trajectory matching (the paper: 25; official code 15).", ge=1)
    label_lr: float = key(150.0, "SGD learning rate of the label logits.", gt=0.0)
    label_momentum: float = key(0.5, "SGD momentum of the label logits.", ge=0.0, lt=1.0)
    budgets: list[int | float] = key(
        [150, 300, 500, 1000, 1500],
        "Flip budgets: counts (int) or fractions of the training set (float in (0, 1)).",
    )
    random_baseline: bool = key(True, "Also train user models on the same number of random flips to the target.")
    matched_baseline: bool = key(
        True,
        "Also train user models on random flips with the FLIP flips' class make-up (per class, as many random images,"
        " given the same labels): what the choice of images adds.",
    )
    user_epochs: int = key(200, "Epochs of each user model.", ge=1)
    user_lr: float = key(
        0.1,
        "User-model SGD learning rate (Nesterov momentum 0.9, lr x0.1 at 3/8 and 5/8 of training).",
        gt=0.0,
    )
    soft: bool = key(
        False,
        "Train user models on soft labels softmax(alpha*onehot + (1-alpha)*logits) (distillation) instead of hard "
        "flips.",
    )
    alpha: float = key(0.5, "Soft-label mixing alpha (flip_labels.soft only).", ge=0.0, le=1.0)
    label_file: str | None = key(
        None,
        "clients.FlipLabelClient: .npy of labels for the whole training set (by sample id) from a pipeline run; null:"
        " each attacker computes its own.",
    )
    client_budget: int | float = key(
        0.1,
        "clients.FlipLabelClient computing its own labels: flips as a count or a fraction of its local data.",
    )


@dataclass
class ResourcesConfig:
    """resources: Ray resources and timeouts."""

    num_cpus: float = key(1.0, "CPUs per client actor.", gt=0.0)
    num_gpus: float = key(
        0.0,
        "GPUs per client actor (fractions share a GPU); server evaluation also uses CUDA when > 0.",
        ge=0.0,
    )
    ray_address: str | None = key(None, "Address of an existing Ray cluster (null: start a local one, bound to "
                                        "127.0.0.1); --ray-address overrides.")
    ray_connect_timeout: float = key(30.0, "Seconds to wait when joining resources.ray_address before the run fails.",
                                     gt=0.0)
    round_timeout: float = key(1800.0, "Seconds the server waits for a round's replies; clients that have not "
                                       "answered by then count as failed and the run goes on.", gt=0.0)
    memory_gb: float | None = key(
        None,
        "Memory a process may use for the dataset (GB); a synthetic dataset estimated to need more is a config "
        "error. null: this machine's physical memory; raise it on purpose (e.g. with swap).",
        gt=0.0,
    )


@dataclass
class ResultsConfig:
    """results: extra result files of a run."""

    tensorboard: bool = key(
        False,
        "Also log every per-round scalar of metrics.csv to RUN_DIR/tensorboard (needs the optional tensorboard "
        "package: pip install 'flip-fl[tensorboard]').",
    )


@dataclass
class CheckpointConfig:
    """checkpoint: what a resumed run (`sim.py --resume RUN_DIR`) continues from."""

    every: int = key(1, "Write RUN_DIR/checkpoint.pt (global model, strategy and client state, RNG state) every k "
                        "rounds, after the last round and on interrupt; a resumed run repeats at most k - 1 rounds.",
                     ge=1)


@dataclass
class Config:
    """A whole run's configuration: one section per concern."""

    seed: int = key(0, "Seed of data generation, partitioning, sampling, model init and local training.", ge=0,
                    le=2**63 - 1)
    data: DataConfig = section(DataConfig, "Dataset and partitioning.")
    model: ModelConfig = section(ModelConfig, "Model architecture.")
    federation: FederationConfig = section(FederationConfig, "Clients and rounds.")
    roles: RolesConfig = section(RolesConfig, "Client classes by role.")
    training: TrainingConfig = section(TrainingConfig, "Benign local training.")
    server: ServerConfig = section(ServerConfig, "Aggregation and evaluation on the server.")
    attack: AttackConfig = section(AttackConfig, "Malicious clients and their backdoor.")
    defense: DefenseConfig = section(DefenseConfig, "The server's defense, its parameters, low-confidence rejection.")
    flip_defense: FlipDefenseConfig = section(
        FlipDefenseConfig,
        "FLIP trigger inversion and hardening on benign clients (clients.FlipDefenseClient).",
    )
    flip_labels: FlipLabelsConfig = section(
        FlipLabelsConfig,
        "FLIP label-only attack: experts, trajectory matching, flips, user models (sim.py labels) and "
        "clients.FlipLabelClient.",
    )
    resources: ResourcesConfig = section(ResourcesConfig, "Ray resources and timeouts.")
    results: ResultsConfig = section(ResultsConfig, "Extra result files (TensorBoard).")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints for resuming an interrupted run.")
