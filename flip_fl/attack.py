"""The configured backdoor trigger (shared by malicious clients and the server's ASR evaluation)."""

from __future__ import annotations

from flip_fl.config import AttackConfig
from flip_fl.schema import ConfigError
from flip_fl.triggers import Trigger, create_trigger


def build_trigger(attack: AttackConfig, image_shape: tuple[int, int, int]) -> Trigger:
    """`attack.trigger` with `attack.trigger_args` for images of `image_shape`; bad args are config errors."""
    try:
        return create_trigger(attack.trigger, image_shape, **attack.trigger_args)
    except ValueError as err:
        key = "attack.trigger" if "unknown trigger" in str(err) else "attack.trigger_args"
        raise ConfigError(f"{key}: {err}") from None
