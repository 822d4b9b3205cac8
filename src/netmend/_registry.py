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

    def __init__(self, kind: str, reserved: Iterable[str] = (), caller: str = "") -> None:
        self.kind = kind
        self.reserved = frozenset(reserved)  # the calling function's own keywords
        self.caller = caller  # that function, as a user calls it ("netmend.identify")
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
        article = "an" if self.kind[:1] in "aeiou" else "a"
        if callable(name):  # @register without its call: the function came as the name
            raise TypeError(
                f"register takes the {self.kind}'s name first: @register('my_name', "
                "options=(...)) above the function, not a bare @register"
            )
        if not isinstance(name, str) or not name or any(c in name for c in _NOT_IN_NAMES):
            raise ValueError(
                f"{article} {self.kind}'s name must be a non-empty string without spaces or any "
                f"of {' '.join(_NOT_IN_NAMES.strip())} (the command line splits pipelines and "
                f"options at them); got {name!r}"
            )
        if isinstance(options, str):  # a string is an iterable of its letters
            raise TypeError(
                f"options must be a list of option names, e.g. options=({options!r},); got the "
                f"string {options!r}"
            )
        declared = None if options is None else frozenset(options)
        clash = sorted((declared or frozenset()) & self.reserved)
        if clash:
            raise ValueError(
                f"option(s) {clash} of {self.kind} {name!r} share a name with an argument of "
                "the call that runs it, so they could never reach it: rename them"
            )

        def deco(fn: F) -> F:
            if name in self._items:
                builtin = getattr(self._items[name], "__module__", "").startswith("netmend.")
                why = (
                    f"a built-in {self.kind} has that name: choose another"
                    if builtin
                    else "a module imported twice registers twice: register each name once"
                )
                raise ValueError(
                    f"{article} {self.kind} named {name!r} is already registered ({why})"
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
        hints = "".join(self._hint(u, known) for u in unknown)
        accepted = ", ".join(sorted(known)) if known else "no options"
        raise ValueError(
            f"unknown option(s) {unknown} for {self.kind} {name!r}{hints}. It accepts: "
            f"{accepted}. A misspelt option would otherwise be ignored silently."
        )

    def _hint(self, word: str, known: Iterable[str]) -> str:
        """The closest option, or the closest of the calling function's own keywords when that
        is closer (``cache_directory`` -> ``cache_dir``, not a method option; ``seeds`` ->
        ``seed``, not ``steps``)."""
        ours = set(self.reserved) - {"model", "train", "failures", "causes", "method"}
        close = difflib.get_close_matches(word, [*known, *ours], n=1, cutoff=0.6)
        if not close:
            return ""
        if close[0] in ours and self.caller:
            return f" (did you mean {close[0]!r}, an argument of {self.caller} itself?)"
        return f" (did you mean {close[0]!r}?)"

    def available(self, research: bool = True) -> list[str]:
        """The registered names, sorted; ``research=False`` leaves out the research-only ones."""
        return sorted(n for n in self._items if research or n not in self._research)

    def research_only(self) -> dict[str, str]:
        """The research-only names, each with why it is not recommended."""
        return dict(self._research)


_NOT_IN_NAMES = " /[],=\t\n"
"""Characters a registered name may not hold: ``bench --pipelines`` splits at ``/``,
options are given in brackets, lists at commas."""


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
