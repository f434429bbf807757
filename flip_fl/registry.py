"""The pluggable parts by name: datasets, models, triggers, defenses, FLIP defense schedules.

Each family is a `Registry`. An implementation registers itself with a decorator beside its code, which
also sets its `name`:

    @DEFENSES.register("krum")
    class KrumDefense(Defense): ...

A registry imports the modules it names (every module of a package) the first time it is asked for its
names or a part, so adding a part is writing its file: there is no list to edit. The families that take
user code (`defense.name`, `attack.trigger`) also accept a dotted path `package.module.Class`, importable
from the working directory or PYTHONPATH, to a subclass of the family's base class.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from flip_fl.errors import ConfigError, one_line

T = TypeVar("T")


def import_class(dotted: str, key_path: str, base: type | None = None, example: str = "") -> type:
    """Import `package.module.Class` and check it subclasses `base` (when given) and is not abstract.

    Whatever importing the module raises (ImportError, SyntaxError, an exception in its top-level code,
    even SystemExit) is a ConfigError naming the key, the module and the exception.
    """
    module_name, _, class_name = dotted.rpartition(".")
    if not module_name:
        raise ConfigError(f"{key_path}: {dotted!r} is not a dotted path like {example or 'package.module.Class'!r}")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name, None)
    except ImportError as err:
        raise ConfigError(f"{key_path}: cannot import module {module_name!r} from the working directory or "
                          f"PYTHONPATH ({one_line(err)})") from None
    except (Exception, SystemExit) as err:  # the module's own code failed: name it, never a traceback
        raise ConfigError(f"{key_path}: importing module {module_name!r} raised {type(err).__name__}: "
                          f"{one_line(err)}") from None
    if cls is None:
        raise ConfigError(f"{key_path}: module {module_name!r} has no class {class_name!r}")
    if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key_path}: {dotted} does not subclass {base.__module__}.{base.__qualname__}")
    if getattr(cls, "__abstractmethods__", None):
        raise ConfigError(f"{key_path}: {dotted} is abstract (missing {', '.join(sorted(cls.__abstractmethods__))})")
    return cls


class Registry(Mapping[str, Any]):
    """One family of parts by name, in registration order, found by importing `modules` on first use.

    Args:
        kind: what a part is ("defense"), for messages.
        modules: the modules (or packages, all of whose modules are imported) that register the parts.
        key_path: the config key that names a part of this family (for messages).
        base: dotted path of the base class of user parts given by dotted path; None: names only.
        sort: list the names alphabetically (else in registration order).
    """

    def __init__(self, kind: str, modules: Sequence[str], key_path: str, base: str | None = None,
                 sort: bool = False) -> None:
        self.kind, self.modules, self.key_path, self.base, self.sort = kind, tuple(modules), key_path, base, sort
        self._parts: dict[str, Any] = {}
        self._loaded = False

    def register(self, name: str, **attributes: Any) -> Callable[[T], T]:
        """Decorator: register the decorated class or function as `name` and set its `name` and `attributes`."""
        def decorate(part: T) -> T:
            if name in self._parts and self._parts[name] is not part:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            for attribute, value in {"name": name, **attributes}.items():
                setattr(part, attribute, value)
            self._parts[name] = part
            return part
        return decorate

    def load(self) -> None:
        """Import the registering modules (once)."""
        if self._loaded:
            return
        self._loaded = True
        for name in self.modules:
            module = importlib.import_module(name)
            for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{name}.{info.name}")

    @property
    def names(self) -> tuple[str, ...]:
        """The registered names (alphabetical with `sort`, else in registration order)."""
        self.load()
        return tuple(sorted(self._parts)) if self.sort else tuple(self._parts)

    def accepts_paths(self) -> bool:
        """Whether a dotted path to a user class is a valid choice."""
        return self.base is not None

    def lookup(self, name: str, key_path: str | None = None) -> Any:
        """The part registered as `name`, or the class at dotted path `name`; ConfigError otherwise."""
        where = key_path or self.key_path
        self.load()
        if name in self._parts:
            return self._parts[name]
        if self.base is not None and "." in name:
            return import_class(name, where, self.base_class())
        user = "; or a dotted path to your own class" if self.base is not None else ""
        raise ConfigError(f"{where}: unknown {self.kind} {name!r}; choose one of {', '.join(self.names)}{user}")

    def base_class(self) -> type:
        """The base class of this family's parts."""
        if self.base is None:
            raise TypeError(f"the {self.kind} family has no base class")
        module, _, cls = self.base.rpartition(".")
        return getattr(importlib.import_module(module), cls)

    def __getitem__(self, name: str) -> Any:
        self.load()
        return self._parts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


DATASETS = Registry("dataset", ["flip_fl.data.sources"], "data.name")
"""Loaders `Config -> (train, test)` with a `num_classes` attribute (`flip_fl.data.sources`)."""

MODELS = Registry("model", ["flip_fl.models"], "model.name")
"""Architectures `(num_classes, in_channels, image_size, **options) -> nn.Module` (`flip_fl.models`)."""

TRIGGERS = Registry("trigger", ["flip_fl.attacks.triggers"], "attack.trigger", base="flip_fl.attacks.triggers.Trigger")
"""Trigger classes (`flip_fl.attacks.triggers`); user triggers subclass `Trigger`."""

DEFENSES = Registry("defense", ["strategies"], "defense.name", base="strategies.defense.Defense", sort=True)
"""Server defenses, one module each in the top-level `strategies` package; user defenses subclass `Defense`."""

FLIP_SCHEDULES = Registry("FLIP defense schedule", ["flip_fl.defenses.flip_defense"], "flip_defense.schedule",
                          sort=True)
"""The FLIP defense's client-side schedules `(FlipRound, warmup) -> None` (`flip_fl.defenses.flip_defense`)."""

