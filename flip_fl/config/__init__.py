"""The configuration: schema sections, loading with overrides, cross-key validation, the generated reference.

- `sections`: every key, its type, default and meaning (the dataclasses of `Config`);
- `schema`: the generic typed-dataclass loader (unknown keys, types, ranges) and `ConfigError`;
- `loading`: YAML files, `--set key.path=value` overrides, `load_config`;
- `validation`: rules across keys (impossible combinations are errors);
- `derived`: facts several layers need (the attack schedule, the round sampler, f for defenses);
- `reference`: `docs/CONFIG.md`, generated from the sections.
"""

from flip_fl.config.derived import (
                                    attack_schedule,
                                    defense_params,
                                    max_attackers_per_round,
                                    num_attackers,
                                    round_sampler,
)
from flip_fl.config.loading import (
                                    apply_overrides,
                                    config_from_dict,
                                    from_yaml,
                                    load_config,
                                    parse_override,
                                    read_yaml,
                                    to_yaml,
)
from flip_fl.config.reference import config_reference_markdown
from flip_fl.config.schema import ConfigError, key
from flip_fl.config.sections import (
                                    AttackConfig,
                                    Config,
                                    DataConfig,
                                    DefenseConfig,
                                    FastScheduleConfig,
                                    FederationConfig,
                                    FlipDefenseConfig,
                                    FlipLabelsConfig,
                                    ModelConfig,
                                    ResourcesConfig,
                                    ResultsConfig,
                                    RolesConfig,
                                    ServerConfig,
                                    SyntheticConfig,
                                    TrainingConfig,
)
from flip_fl.config.validation import validate, validate_labels

__all__ = [
    "AttackConfig", "TrainingConfig", "RolesConfig", "Config", "ConfigError", "DataConfig", "DefenseConfig",
    "FederationConfig", "FlipDefenseConfig", "FastScheduleConfig", "FlipLabelsConfig", "ModelConfig",
    "ResourcesConfig", "ResultsConfig", "ServerConfig",
    "SyntheticConfig", "apply_overrides", "config_from_dict", "config_reference_markdown", "from_yaml", "load_config",
    "max_attackers_per_round", "num_attackers", "parse_override", "read_yaml", "to_yaml", "validate", "validate_labels",
    "attack_schedule", "defense_params", "key", "round_sampler",
]
