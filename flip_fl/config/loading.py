"""Reading config files: YAML with a strict safe loader, `--set key.path=value` overrides, validation into a Config.

The loader is `yaml.SafeLoader` (no Python objects) that also refuses a key given twice in one mapping
(plain YAML keeps the last one silently). Every problem with a file -- missing, unreadable, binary,
huge, not YAML -- is a ConfigError naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flip_fl.config.renamed import check_renamed
from flip_fl.config.schema import ConfigError, dump_section, iter_values, load_section
from flip_fl.config.sections import Config
from flip_fl.config.validation import validate

MAX_CONFIG_BYTES = 10_000_000
"""A config or sweep file larger than this is refused (they are a few kB)."""
MAX_CONFIG_VALUES = 1_000_000
"""Most values a config document may hold once YAML aliases are expanded."""
PROJECT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
"""The project's `configs/` folder (in a checkout), where a bare config file name is also looked for."""


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses duplicate keys in a mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A mapping whose keys are unique (merge keys `<<` may still be overridden)."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: the base constructor reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text parsed with `StrictLoader`; errors are ConfigErrors that name `where` (and the line)."""
    try:
        value = yaml.load(text, Loader=StrictLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{where}: not valid YAML{line}: {problem}") from None
    except (RecursionError, MemoryError):
        raise ConfigError(f"{where}: YAML nested too deeply or too large") from None
    for _ in iter_values(value, where, MAX_CONFIG_VALUES):
        pass
    return value


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split a `--set key.path=value` item; the value is parsed as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    path, text = item.split("=", 1)
    if not path or any(not part for part in path.split(".")):
        raise ConfigError(f"--set {item!r}: the key path is empty or malformed")
    return path.split("."), parse_yaml(text, f"--set {path}: value {text[:40]!r}")


def set_key_path(raw: dict[str, Any], path: str, value: Any, where: str) -> None:
    """Write `value` at the dotted key `path` of a raw config mapping, creating sections on the way.

    Errors name `where` the path came from (e.g. `--set defense.name` or `grid defense.name`).
    """
    parts = path.split(".")
    if not path or any(not p for p in parts):
        raise ConfigError(f"{where}: {path!r} is not a key path like defense.name")
    node = raw
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:i + 1])} is not a section")
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Write each `key.path=value` into the raw mapping (validation happens afterwards)."""
    for item in overrides:
        parts, value = parse_override(item)
        path = ".".join(parts)
        set_key_path(raw, path, value, f"--set {path}")
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with `StrictLoader`, with errors that name the file."""
    path = Path(path)
    try:
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        if not path.is_file():
            raise ConfigError(f"{path}: not a regular file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for a config file")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected UTF-8 YAML)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return raw


def resolve_config(path: str | Path, folder: str = "") -> Path:
    """The config file `path` names: a file in the working directory, else for a bare file name the project's.

    A bare name (`cifar.yaml`, no directory part) that is not a file here is looked for in the project's
    `configs/<folder>` (`folder`: e.g. "sweeps" for sweep files) and then `configs/`; a path with a
    directory part always means that path. A bare name found nowhere is a ConfigError naming both places.
    """
    given = Path(path)
    if given.exists() or given.name != str(path) or given.name in ("", ".", ".."):
        return given
    for where in dict.fromkeys([PROJECT_CONFIGS / folder, PROJECT_CONFIGS]):
        if (where / given).is_file():
            return where / given
    if PROJECT_CONFIGS.is_dir():
        raise ConfigError(f"{path}: config file not found (neither in the working directory nor in {PROJECT_CONFIGS})")
    return given


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a raw mapping into a Config (types, ranges, then cross-key rules)."""
    check_renamed(raw)
    cfg = load_section(Config, raw, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load, override and validate a YAML config file."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    return config_from_dict(raw)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what the run actually used)."""
    return yaml.safe_dump(dump_section(cfg), sort_keys=False)


def from_yaml(text: str) -> Config:
    """Inverse of `to_yaml` (used by clients that receive the config in a message)."""
    return config_from_dict(parse_yaml(text, "the run's config"))
