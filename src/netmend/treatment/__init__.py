"""Treatments: each returns a new, repaired model (the input model is never modified).

Registered by name (``netmend.treatment.available()``); a new treatment is one function
decorated by :func:`register`.
"""

from __future__ import annotations

from netmend.treatment import align, methods, relabel  # noqa: F401  (registers the treatments)
from netmend.treatment.base import TreatContext, available, get, register, research_only

__all__ = ["TreatContext", "available", "get", "register", "research_only"]
