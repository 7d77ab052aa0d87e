"""Registries: the extension points (tasks, sensitivities, allocators, models, weight-clip
methods, layer twins) map a name to a function. Adding one is one decorated function in one
file; CLI choices, config checks and error messages read the registry's keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from hawq.base.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping ``name -> item`` filled by :meth:`register` (a decorator).

    ``get`` of an unknown name raises :class:`ConfigError` listing the known names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """``@reg.register("name")`` on a function (returns it unchanged), or
        ``reg.register("name", item)``. Registering a name twice raises ConfigError."""
        def add(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add if item is None else add(item)

    def get(self, name: str) -> T:
        """The item registered as ``name``; ConfigError naming the choices when unknown."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ConfigError(f"unknown {self.kind} {name!r}: use one of {self.names()}") from None

    def check(self, name: str, argument: str | None = None) -> str:
        """``name`` when registered, else a ConfigError naming ``argument`` and the choices."""
        if name not in self._items:
            arg = argument or self.kind
            raise ConfigError(f"{arg}={name!r}: use one of {self.names()}")
        return name

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
