"""The pluggable parts known by name: datasets, models, triggers, defenses.

Each family's names are declared here, once. They are the choices the config schema accepts for
`data.name`, `model.name`, `attack.trigger` and `defense.name` (and so the types in docs/CONFIG.md);
implementations register under a declared name next to their code:

    @MODELS.register("tiny_cnn")
    class TinyCNN(nn.Module): ...

To add a part: declare its name below, register the implementation where it is written.
`tests/test_registry.py` checks that every declared name has an implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, Any]):
    """Implementations of one family of parts by name, limited to the names declared for the family.

    A mapping from registered name to implementation, in declaration order.
    """

    def __init__(self, kind: str, names: Sequence[str]) -> None:
        self.kind = kind
        self.names: tuple[str, ...] = tuple(names)
        self._parts: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated class or function as `name`."""
        def decorate(part: T) -> T:
            self.add(name, part)
            return part
        return decorate

    def add(self, name: str, part: Any) -> None:
        """Register `part` as `name` (a declared name, registered once)."""
        if name not in self.names:
            raise ValueError(f"{name!r} is not a declared {self.kind} name; declare it in flip_fl/registry.py")
        if name in self._parts:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._parts[name] = part

    def lookup(self, name: str) -> Any:
        """The implementation of `name`; ValueError naming the choices for an unknown name."""
        if name not in self._parts:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names)}")
        return self._parts[name]

    def missing(self) -> list[str]:
        """Declared names without an implementation (empty once every implementing module is imported)."""
        return [n for n in self.names if n not in self._parts]

    def __getitem__(self, name: str) -> Any:
        return self._parts[name]

    def __iter__(self) -> Iterator[str]:
        return iter([n for n in self.names if n in self._parts])

    def __len__(self) -> int:
        return len(self._parts)


DATASETS = Registry("dataset", ("synthetic", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100"))
"""Loaders `Config -> (train, test)`, registered in `flip_fl.data.sources`."""

MODELS = Registry("model", ("tiny_cnn", "mnist_cnn", "resnet18", "resnet32"))
"""Architectures `(num_classes, in_channels, image_size, **options) -> nn.Module`, in `flip_fl.models`."""

TRIGGERS = Registry("trigger", ("pixel_pattern", "dba", "blended", "sinusoidal", "turner", "fixed_pixels"))
"""Trigger classes, registered in `flip_fl.attacks.triggers`."""

DEFENSES = Registry("defense", ("fedavg", "krum", "multikrum", "bulyan", "median", "trimmed_mean", "norm_clip",
                                "weak_dp", "rfa", "foolsgold", "rlr", "fltrust", "flame"))
"""Server strategy classes, registered in the top-level `strategies` package."""
