"""A name -> function registry, shared by identification methods and treatments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """Functions registered by name; ``kind`` names them in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """A decorator registering its function under ``name`` (names are unique)."""

        def deco(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"a {self.kind} named {name!r} is already registered")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        """The function registered as ``name``; raises with the known names otherwise."""
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.available()}")
        return self._items[name]

    def available(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)
