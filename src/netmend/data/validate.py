"""Validation of the arguments around the data: seeds, ``k``, cause indices, pandas inputs.

Each check turns an input that would otherwise give a silently wrong answer into a
:class:`ValueError` / :class:`TypeError` that says what to pass instead (see ``docs/safety.md``).
pandas is never imported here: a pandas object is recognised by its type's module.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any

import numpy as np
import torch

from netmend._warnings import warn


def _integer(value: Any) -> int | None:
    """``value`` as an int if it is a Python, numpy or 0-d torch integer (not a bool)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.is_floating_point() or value.dtype == torch.bool:
            return None
        return int(value.item())
    if isinstance(value, (numbers.Integral, np.integer)):
        return int(value)
    return None


def check_seed(seed: Any) -> int:
    """The seed as an ``int``; ``None`` and non-integers are refused.

    netmend is deterministic given its seed, so there is no "unseeded" mode: ``seed=None``
    would have to mean either "seed 0" or "a fresh random seed", and either reading could be
    the wrong one for the caller.

    Raises:
        TypeError: ``seed`` is not an integer. ValueError: a negative seed.
    """
    s = _integer(seed)
    if s is None:
        raise TypeError(
            f"seed must be an integer (netmend is deterministic given its seed); got {seed!r}. "
            "Pass seed=0 for the default, or e.g. seed=secrets.randbits(32) for a fresh draw "
            "(and keep it to reproduce the run)."
        )
    if s < 0:  # numpy's generators refuse them, deep inside a run
        raise ValueError(f"seed must be a whole number >= 0; got {s}")
    return s


def check_k(k: Any, n: int) -> Any:
    """Validate a cause-selection ``k`` against a training set of ``n`` examples.

    Integers (Python, numpy or 0-d torch) are returned as ``int`` and must lie in ``[0, n]``;
    fractions (floats) in ``(0, 1)``; strings "auto"/"positive" and ``None`` pass.

    Raises:
        ValueError: an integer ``k`` above ``n`` or below 0, a fraction outside ``(0, 1)``,
            an unknown string.
        TypeError: a bool, or another type.
    """
    if k is None or (isinstance(k, str) and k in ("auto", "positive")):
        return k
    if isinstance(k, str):
        raise ValueError(f"k must be an int, a fraction, 'positive', 'auto' or None; got {k!r}")
    as_int = _integer(k)
    if as_int is not None:
        if not 0 <= as_int <= n:
            raise ValueError(
                f"k={as_int} is outside [0, {n}]: the training set has {n} examples; pass a "
                f"k <= {n}, a fraction in (0, 1), or k='auto'"
            )
        return as_int
    if isinstance(k, torch.Tensor) and k.ndim == 0 and k.is_floating_point():
        k = float(k.item())
    if isinstance(k, (float, np.floating)) and not isinstance(k, (bool, np.bool_)):
        if not 0 < float(k) < 1:
            raise ValueError(
                f"a fractional k must lie in (0, 1); got {k} (pass an int for a number of causes)"
            )
        return float(k)
    raise TypeError(
        f"k must be an int, a fraction in (0, 1), 'positive', 'auto' or None; got "
        f"{type(k).__name__} {k!r}"
    )


def check_causes(causes: Any, n: int) -> torch.Tensor:
    """Cause indices ``[K]`` (int64) from integer indices or a boolean mask ``[n]``.

    Args:
        causes: training indices (list, numpy array or tensor of integers), or a boolean mask
            of length ``n`` (``True`` = cause).
        n: the size of the training set.

    Returns:
        The sorted, unique indices, int64.

    Raises:
        TypeError: floating-point causes (scores or probabilities are not indices: select
            them with ``netmend.identification.select`` first) or another type.
        ValueError: a mask of the wrong length, indices out of ``[0, n)``, duplicates, or no
            causes at all.
    """
    if isinstance(causes, torch.Tensor):
        arr = causes.detach().cpu().numpy()
    else:
        try:
            arr = np.asarray(causes)
        except Exception as exc:
            raise TypeError(f"causes: cannot read {type(causes).__name__} as indices") from exc
    if arr.dtype == bool:
        if arr.ndim != 1 or arr.shape[0] != n:
            raise ValueError(
                f"causes is a boolean mask of shape {arr.shape}, but the training set has {n} "
                f"examples: pass a mask of shape ({n},) or the causes' indices"
            )
        arr = np.flatnonzero(arr)
    elif arr.size == 0:
        arr = arr.astype(np.int64)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"causes must be integer training indices or a boolean mask; got dtype {arr.dtype}. "
            "Scores are not causes: pick them with netmend.identification.select(scores, k)"
        )
    if arr.ndim != 1:  # a scalar or a matrix is not a list of causes: say so, don't flatten
        raise ValueError(
            f"causes must be a 1-D list of training indices or a boolean mask; got shape "
            f"{arr.shape}"
        )
    arr = arr.astype(np.int64)
    if arr.size == 0:
        raise ValueError(
            "no causes to treat (an empty list: the identification selected none, try a larger "
            "k). To run the treatment with nothing removed, as a control, pass "
            "allow_no_causes=True"
        )
    if int(arr.min()) < 0 or int(arr.max()) >= n:
        bad = arr[(arr < 0) | (arr >= n)]
        raise ValueError(
            f"causes must be training indices in [0, {n}); got {bad[:5].tolist()} "
            "(negative indices are not read as counting from the end)"
        )
    uniq = np.unique(arr)
    if uniq.size != arr.size:
        raise ValueError(
            f"causes hold {arr.size - uniq.size} duplicate index(es) (e.g. "
            f"{_first_duplicate(arr)}): each training example is a cause once; pass unique "
            "indices (np.unique)"
        )
    return torch.from_numpy(uniq)


def _first_duplicate(arr: np.ndarray) -> int:
    values, counts = np.unique(arr, return_counts=True)
    return int(values[counts > 1][0])


def check_count(n: Any, name: str = "n") -> int:
    """A positive integer count (``culprits(i, n)``): Python, numpy or 0-d torch integers.

    Raises:
        TypeError: not an integer. ValueError: ``n <= 0``.
    """
    v = _integer(n)
    if v is None:
        raise TypeError(f"{name} must be a positive integer; got {n!r}")
    if v <= 0:
        raise ValueError(f"{name} must be >= 1; got {v}")
    return v


def check_index(i: Any, size: int, name: str = "i") -> int:
    """An index into ``size`` items (Python, numpy or 0-d torch integer; negative counts from
    the end, as in Python).

    Raises:
        TypeError: not an integer (a bool or a float is not an index). IndexError: out of range.
    """
    v = _integer(i)
    if v is None:
        raise TypeError(f"{name} must be an integer index; got {i!r}")
    if not -size <= v < size:
        raise IndexError(f"{name} = {v} is out of range for {size} item(s)")
    return v


# ----------------------------------------------------------------------------- pandas


def _is_pandas(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "pandas"


def unwrap_pandas(data: Any, name: str) -> Any:
    """A pair ``(X, y)`` of pandas objects as numpy arrays, matched **by position**.

    netmend scores examples by position (score ``i`` belongs to row ``i``). When ``X`` and
    ``y`` carry different indexes (e.g. ``y`` was sorted or filtered on its own), pandas
    would align them by label but netmend pairs them by position: the pairing is kept by
    position and a warning says so. Non-numeric columns are refused. Other inputs are
    returned unchanged, and pandas is never imported.

    Raises:
        TypeError: a DataFrame with non-numeric columns.
    """
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return data
    X, y = data
    if not (_is_pandas(X) or _is_pandas(y)):
        return data
    both = _is_pandas(X) and _is_pandas(y) and hasattr(X, "index") and hasattr(y, "index")
    if both and not X.index.equals(y.index):
        warn(
            f"{name}: the inputs' and labels' pandas indexes differ; netmend pairs row i of "
            "X with entry i of y (by position), not by index label. Align them first "
            "(y = y.loc[X.index]) if that is not what you mean.",
        )
    return (_pandas_values(X, name, "inputs"), _pandas_values(y, name, "labels"))


def _numeric(dtype: Any) -> np.dtype | None:
    """The numpy dtype behind a (pandas) dtype if it is numeric or bool, else ``None``."""
    try:
        dt = np.dtype(dtype)
    except TypeError:  # a pandas extension dtype: nullable Int64/Float64/boolean have one
        inner = getattr(dtype, "numpy_dtype", None)
        if inner is None:  # category, string, ...
            return None
        dt = np.dtype(inner)
    return dt if (np.issubdtype(dt, np.number) or dt.kind == "b") else None


def _pandas_values(obj: Any, name: str, what: str) -> Any:
    if not _is_pandas(obj):
        return obj
    dtypes: Any = getattr(obj, "dtypes", None)
    if hasattr(dtypes, "items"):  # a DataFrame: one dtype per column
        columns = [(str(c), _numeric(d)) for c, d in dtypes.items()]
        bad = [c for c, d in columns if d is None]
        if bad:
            raise TypeError(
                f"{name}: {what} have non-numeric column(s) {bad[:5]}; encode them as numbers "
                "(e.g. pd.get_dummies or .cat.codes) before calling netmend"
            )
        numpy_dtypes = [d for _, d in columns if d is not None]
    else:
        dt = _numeric(getattr(obj, "dtype", None))
        if dt is None:
            raise TypeError(
                f"{name}: {what} have dtype {getattr(obj, 'dtype', None)}; netmend needs numbers "
                "(labels as class indices 0..C-1, e.g. y.astype('category').cat.codes)"
            )
        numpy_dtypes = [dt]
    target = np.result_type(*numpy_dtypes) if numpy_dtypes else None
    try:
        arr = np.asarray(obj.to_numpy(dtype=target))
    except (TypeError, ValueError) as exc:  # nullable dtypes holding NA
        raise ValueError(
            f"{name}: {what} hold missing values (NA) ({exc}); drop or fill them before calling "
            "netmend"
        ) from None
    return arr if arr.flags.writeable else arr.copy()


def number_option(
    options: Any,
    name: str,
    default: float,
    *,
    integer: bool = False,
    low: float = 0.0,
    strict: bool = False,
) -> Any:
    """A method's numeric option, checked (:func:`check_number`): ``options[name]``, or
    ``default`` when it is not given."""
    return check_number(options.get(name, default), name, integer=integer, low=low, strict=strict)


def check_number(
    v: Any, name: str, *, integer: bool = False, low: float = 0.0, strict: bool = False
) -> Any:
    """A numeric setting named ``name``, checked.

    A fractional number where an integer is needed (``steps=2.7``), a bool, a non-finite
    number or one below ``low`` (at or below it when ``strict``) is refused rather than
    rounded or passed on (``gamma=-1`` reversed the sign of every score; ``steps=0`` ended
    in an unrelated error about saturated softmax). A string is read as the number it spells.

    Returns:
        The value as an ``int`` (``integer``) or a ``float``.

    Raises:
        ValueError: what was passed and what is allowed.
    """
    if isinstance(v, str):  # "7", "1e-3": as a number, as the command line's values arrive
        with contextlib.suppress(ValueError):  # else refused below, as given
            v = int(v) if integer and v.strip().lstrip("+-").isdigit() else float(v)
    bound = f"> {low:g}" if strict else f">= {low:g}"
    kind = "an integer" if integer else "a number"
    n = _integer(v)
    if n is None and isinstance(v, (float, np.floating)) and float(v).is_integer():
        n = int(v)  # 30.0 is 30; 2.7 is refused, not rounded
    if integer:
        ok = n is not None
        value: float = n if n is not None else 0
    else:
        ok = not isinstance(v, (bool, np.bool_)) and isinstance(v, (numbers.Real, np.floating))
        value = float(v) if ok else 0.0
        ok = ok and bool(np.isfinite(value))
    if not ok or value < low or (strict and value == low):
        raise ValueError(f"{name} must be {kind} {bound}; got {v!r}")
    return int(value) if integer else value
