"""A name -> function registry, shared by identification methods and treatments."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """Functions registered by name; ``kind`` names them in error messages.

    Each function may declare the keyword options it reads (``register(name, options=...)``):
    that declaration is the one list :meth:`check_options` holds user options against, so a
    misspelt option (``epocs=3``) is refused instead of silently ignored.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}
        self._options: dict[str, frozenset[str] | None] = {}
        self._research: dict[str, str] = {}

    def register(
        self, name: str, options: Iterable[str] | None = None, research: str | None = None
    ) -> Callable[[F], F]:
        """A decorator registering its function under ``name`` (names are unique).

        Args:
            name: the registered name.
            options: the names of the keyword options the function reads (``()``: none).
                ``None`` declares nothing and leaves the options unchecked (for plug-ins
                written before options were declared; every built-in method declares them).
            research: marks the function *research-only*, with the reason (a measured
                failure, and where it is measured): it stays callable, but
                :meth:`available` lists it only when asked and :meth:`research_only` says
                why.
        """
        declared = None if options is None else frozenset(options)

        def deco(fn: F) -> F:
            if name in self._items:
                article = "an" if self.kind[:1] in "aeiou" else "a"
                raise ValueError(
                    f"{article} {self.kind} named {name!r} is already registered (a module "
                    "imported twice registers twice: register each name once)"
                )
            self._items[name] = fn
            self._options[name] = declared
            if research is not None:
                self._research[name] = research
            return fn

        return deco

    def get(self, name: str) -> F:
        """The function registered as ``name``; raises with the known names otherwise."""
        if not isinstance(name, str) or name not in self._items:
            hint = _suggest(name, self._items) if isinstance(name, str) else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}{hint}; choose one of {self.available()}"
            )
        return self._items[name]

    def options(self, name: str) -> frozenset[str] | None:
        """The options ``name`` declared (``None``: undeclared, not checked)."""
        self.get(name)
        return self._options.get(name)

    def check_options(self, name: str, given: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if ``given`` holds an option ``name`` does not declare.

        The message lists the valid names and suggests the closest one (``epocs`` ->
        ``epochs``).
        """
        known = self.options(name)
        if known is None:
            return
        unknown = sorted(set(given) - known)
        if not unknown:
            return
        hints = "".join(_suggest(u, known) for u in unknown)
        accepted = ", ".join(sorted(known)) if known else "no options"
        raise ValueError(
            f"unknown option(s) {unknown} for {self.kind} {name!r}{hints}. It accepts: "
            f"{accepted}. A misspelt option would otherwise be ignored silently."
        )

    def available(self, research: bool = True) -> list[str]:
        """The registered names, sorted; ``research=False`` leaves out the research-only ones."""
        return sorted(n for n in self._items if research or n not in self._research)

    def research_only(self) -> dict[str, str]:
        """The research-only names, each with why it is not recommended."""
        return dict(self._research)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
