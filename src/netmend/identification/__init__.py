"""Cause identification: one score per training example, positive = harmful.

Methods are registered by name (``netmend.identification.available()``, or
``netmend.available()``); a new method is one file
with a function decorated by :func:`register`.
"""

from __future__ import annotations

from netmend.identification import (  # noqa: F401  (registers the methods)
    baselines,
    ewc,
    graddot,
    influence,
    k_rules,
    linear,
    shapley,
    shapley_mc,
    tracin,
    trak,
)
from netmend.identification.base import (
    Context,
    MethodOutput,
    available,
    class_capped,
    get,
    register,
    reproducible_k,
    select,
)

__all__ = [
    "Context",
    "MethodOutput",
    "available",
    "class_capped",
    "k_rules",
    "get",
    "register",
    "reproducible_k",
    "select",
]
