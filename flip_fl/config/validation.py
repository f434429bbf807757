"""Cross-key rules of the config: impossible combinations are errors, never silent defaults."""

from __future__ import annotations

import math
import os

from flip_fl.config.derived import attack_schedule, defense_params, num_attackers
from flip_fl.config.schema import ConfigError
from flip_fl.config.sections import Config
from flip_fl.registry import DATASETS, DEFENSES

SYNTHETIC_BYTES_PER_PIXEL = 24
"""Peak memory of drawing the synthetic dataset per pixel (float32 temporaries; 17-23 measured)."""


def physical_memory_gb() -> float:
    """This machine's physical memory in GB (infinite where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return math.inf


def validate(cfg: Config) -> None:
    """Cross-key rules: impossible combinations are errors, never silent defaults."""
    num_classes = _validate_data_and_model(cfg)
    _validate_server(cfg)
    _validate_attack(cfg, num_classes)
    _validate_attack_schedule(cfg)
    _validate_defense(cfg)
    flip_defense = cfg.flip_defense
    if len(flip_defense.betas) != 2 or not all(0.0 <= b < 1.0 for b in flip_defense.betas):
        raise ConfigError(f"flip_defense.betas: {flip_defense.betas} must be two numbers in [0, 1), e.g. [0.5, 0.9]")
    if flip_defense.fast.min_steps > flip_defense.fast.max_steps:
        raise ConfigError(f"flip_defense.fast.min_steps: {flip_defense.fast.min_steps} exceeds "
                          f"flip_defense.fast.max_steps ({flip_defense.fast.max_steps})")
    validate_labels(cfg, num_classes)


def _validate_data_and_model(cfg: Config) -> int:
    """Rules of data.*, federation.* and model.*; returns the dataset's number of classes."""
    fed = cfg.federation
    if fed.clients_per_round > fed.num_clients:
        raise ConfigError(f"federation.clients_per_round: {fed.clients_per_round} exceeds "
                          f"federation.num_clients ({fed.num_clients})")
    if cfg.data.partition == "dirichlet" and cfg.data.alpha is None:
        raise ConfigError("data.alpha: required when data.partition is 'dirichlet' (e.g. 0.5)")
    if cfg.data.partition == "iid" and cfg.data.alpha is not None:
        raise ConfigError("data.alpha: only used with data.partition: dirichlet; remove it or change the partition")
    if cfg.data.name == "synthetic" and cfg.data.synthetic.channels not in (1, 3):
        raise ConfigError(f"data.synthetic.channels: {cfg.data.synthetic.channels} is not allowed; choose 1 or 3")
    if cfg.data.name == "synthetic" and cfg.data.synthetic.train_size < fed.num_clients:
        raise ConfigError(f"data.synthetic.train_size: {cfg.data.synthetic.train_size} images cannot "
                          f"be split over {fed.num_clients} clients")
    if cfg.data.name == "synthetic":
        synthetic_memory_check(cfg, cfg.resources.memory_gb or physical_memory_gb())
    if cfg.model.width != 1.0 and cfg.model.name != "resnet18":
        raise ConfigError(f"model.width: only resnet18 has a width option, not {cfg.model.name}")
    return int(DATASETS.lookup(cfg.data.name).num_classes)


def _validate_server(cfg: Config) -> None:
    """server.min_clients is a count up to the sampled clients or a fraction in (0, 1]."""
    m, n = cfg.server.min_clients, cfg.federation.clients_per_round
    if isinstance(m, float) and not 0.0 < m <= 1.0:
        raise ConfigError(f"server.min_clients: {m} must be a count (integer) or a fraction in (0, 1]")
    if isinstance(m, int) and not 1 <= m <= n:
        raise ConfigError(f"server.min_clients: {m} must be between 1 and federation.clients_per_round ({n})")


def synthetic_memory_check(cfg: Config, available_gb: float) -> None:
    """A synthetic dataset must fit in memory while it is drawn (about 24 bytes per pixel at the peak)."""
    syn = cfg.data.synthetic
    pixels = syn.channels * syn.image_size**2
    need_gb = SYNTHETIC_BYTES_PER_PIXEL * (syn.train_size + syn.test_size) * pixels / 1e9
    if need_gb > available_gb:
        name = "train_size" if syn.train_size >= syn.test_size else "test_size"
        raise ConfigError(f"data.synthetic.{name}: {getattr(syn, name)} images of {syn.channels}x{syn.image_size}x"
                          f"{syn.image_size} need about {need_gb:.3g} GB to draw, more than {available_gb:.3g} GB "
                          "(resources.memory_gb; null: this machine's memory); use fewer images or raise "
                          "resources.memory_gb on purpose")


def _validate_attack(cfg: Config, num_classes: int) -> None:
    """Rules of the attack's classes, attackers and windows."""
    fed, attack = cfg.federation, cfg.attack
    if attack.source_label >= num_classes or attack.source_label == attack.target_label:
        raise ConfigError(f"attack.source_label: {attack.source_label} must be -1 or a class of {cfg.data.name} "
                          f"other than attack.target_label ({attack.target_label})")
    if attack.target_label >= num_classes:
        raise ConfigError(f"attack.target_label: {attack.target_label} is not a class of {cfg.data.name} "
                          f"(0..{num_classes - 1})")
    if attack.num_malicious > fed.num_clients:
        raise ConfigError(f"attack.num_malicious: {attack.num_malicious} exceeds federation.num_clients "
                          f"({fed.num_clients})")
    if attack.malicious_ids is not None:
        ids = attack.malicious_ids
        bad = [i for i in ids if not 0 <= i < fed.num_clients]
        if bad:
            raise ConfigError(f"attack.malicious_ids: {bad} are not partition ids (0..{fed.num_clients - 1})")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"attack.malicious_ids: {ids} has duplicates")
        if attack.num_malicious not in (0, len(ids)):
            raise ConfigError(f"attack.num_malicious: {attack.num_malicious} disagrees with the "
                              f"{len(ids)} attack.malicious_ids; set one of them")
    if num_attackers(cfg) > 0 and attack.rounds is None and attack.start_round > fed.num_rounds:
        raise ConfigError(f"attack.start_round: {attack.start_round} is after the last round "
                          f"(federation.num_rounds = {fed.num_rounds}); the attack would never happen")
    if attack.end_round is not None and attack.end_round < attack.start_round:
        raise ConfigError(f"attack.end_round: {attack.end_round} is before attack.start_round ({attack.start_round})")
    if attack.rounds is not None:
        n_attackers = num_attackers(cfg)
        if len(attack.rounds) != n_attackers:
            raise ConfigError(f"attack.rounds: {len(attack.rounds)} schedules given for {n_attackers} attackers")
        for i, item in enumerate(attack.rounds):
            for r in item if isinstance(item, list) else [item]:
                if not 1 <= r <= fed.num_rounds:
                    raise ConfigError(f"attack.rounds[{i}]: round {r} is outside 1..{fed.num_rounds}")


def _validate_attack_schedule(cfg: Config) -> None:
    """Forced sampling must fit every round; attacker lr milestones are fractions of its epochs."""
    attack = cfg.attack
    if attack.force_sampled and num_attackers(cfg) > 0:
        _validate_forced_sampling(cfg)
    if any(not 0.0 < m < 1.0 for m in attack.lr_milestones):
        raise ConfigError(f"attack.lr_milestones: {attack.lr_milestones} must be fractions in (0, 1)")


def _validate_forced_sampling(cfg: Config) -> None:
    """The attackers due plus the benign clients drawn must fit in every round's sample."""
    fed = cfg.federation
    schedule = attack_schedule(cfg)
    if num_attackers(cfg) > fed.clients_per_round:
        schedule_max = schedule.max_due(fed.num_rounds)
        if schedule_max > fed.clients_per_round:
            raise ConfigError(f"attack.force_sampled: {schedule_max} attackers are due in one round but only "
                              f"federation.clients_per_round = {fed.clients_per_round} clients are sampled")
    benign = fed.num_clients - num_attackers(cfg)
    r, due = schedule.fewest_due(fed.num_rounds)  # the round that needs the most benign clients
    need = fed.clients_per_round - due
    if need > benign:
        raise ConfigError(f"federation.clients_per_round: round {r} samples {need} benign clients but only "
                          f"{benign} of the {fed.num_clients} clients are benign; sample fewer, add clients "
                          "or set attack.force_sampled: false")


def _validate_defense(cfg: Config) -> None:
    """The defense's own rules across keys (`Defense.check`), on its parameters."""
    DEFENSES.lookup(cfg.defense.name).check(defense_params(cfg), cfg)


def validate_labels(cfg: Config, num_classes: int) -> None:
    """Rules of the flip_labels.* section."""
    flip_labels = cfg.flip_labels
    lo_hi = flip_labels.trajectory_fraction
    if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0:
        raise ConfigError(f"flip_labels.trajectory_fraction: {lo_hi} must be [lo, hi] with 0 <= lo < hi <= 1")
    for i, budget in enumerate(flip_labels.budgets + [flip_labels.client_budget]):
        where = f"flip_labels.budgets[{i}]" if i < len(flip_labels.budgets) else "flip_labels.client_budget"
        if isinstance(budget, float) and not 0.0 < budget < 1.0:
            raise ConfigError(f"{where}: {budget} must be a count (integer) or a fraction in (0, 1)")
        if isinstance(budget, int) and budget < 1:
            raise ConfigError(f"{where}: {budget} must be at least 1")
