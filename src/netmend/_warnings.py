"""Warnings attributed to the user's line, not to netmend's internals.

A fixed ``stacklevel`` is right for one call path only: the same warning is raised under
``identify``, under ``repair`` (one level deeper) and under the wrapper that keeps the global
RNG, so with a fixed level it points into netmend on most of them, and a user's
``warnings.filterwarnings(..., module=...)`` or the file shown in the message is useless.
:func:`warn` walks the stack instead, to the first frame outside the netmend package.
"""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)``, attributed to the first caller outside netmend.

    Under ``torch.distributed`` only rank 0 warns: the ranks hold the same model and data
    (checked before any pass), so every rank would say the same thing, once per rank.

    Args:
        message: what happened and what to do about it.
        category: the warning class (default ``UserWarning``).
    """
    if _other_rank():
        return
    level, frame = 1, sys._getframe(0)  # level 1: this function's own frame
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _PACKAGE
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def called_by_user() -> bool:
    """Whether the public entry point that called this function was called from outside
    netmend (the user's code), not by netmend itself (``repair``, the class guard, the
    controls, the CLI): a warning its own caller already gave is not said twice."""
    frame = sys._getframe(2)  # above this function and the entry point's own body
    while (
        frame is not None
        and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE)
        and frame.f_code.co_name == "wrapped"
    ):  # the entry point's wrappers (api._public)
        frame = frame.f_back  # type: ignore[assignment]
    return frame is not None and not os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE)


def _other_rank() -> bool:
    """Whether this process is a rank other than 0 of an initialised process group (read
    without importing torch: a process that never imported it has no group)."""
    dist = sys.modules.get("torch.distributed")
    return bool(
        dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
    )
