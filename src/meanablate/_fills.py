"""Which number an array of a given dtype holds for a mean: exactly, or an error.

Integer (and bool) dtypes take only whole numbers in their range — no wrap-around
(``300`` into ``uint8``), no float detour (``2**53 + 1`` into ``int64``), no NaN; float
dtypes take any value whose magnitude they can hold, rounded as a cast rounds.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from meanablate.errors import UnrepresentableValueError

__all__ = ["fill_value"]


def _dtype_range(dtype: Any) -> tuple[int, int] | None:
    """``(min, max)`` of an integer (or bool) numpy/torch dtype; ``None`` for floats."""
    if isinstance(dtype, np.dtype):
        if dtype == np.bool_:
            return 0, 1
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            return int(info.min), int(info.max)
        return None
    import torch

    if dtype == torch.bool:
        return 0, 1
    if dtype.is_floating_point or dtype.is_complex:
        return None
    info = torch.iinfo(dtype)
    return int(info.min), int(info.max)


def _exact_int(v: Any) -> int | None:
    """``v`` as a Python int if it is a whole number, else ``None`` (NaN, inf, 2.5, 1/3)."""
    if isinstance(v, (numbers.Integral, np.bool_)):
        return int(v)
    if isinstance(v, numbers.Rational):
        return int(v.numerator) if v.denominator == 1 else None
    f = float(v)
    return int(f) if math.isfinite(f) and f.is_integer() else None


def fill_value(dtype: Any, i: int, v: Any) -> int | float:
    """The Python number that an array of ``dtype`` will hold for mean ``v`` of neuron ``i``.

    Integer dtypes take only whole numbers in their range (no wrap-around, no float
    rounding); float dtypes take anything whose magnitude they can hold (rounded to the
    nearest representable value, as any cast does; NaN and inf pass as themselves).
    """
    lo_hi = _dtype_range(dtype)
    if lo_hi is not None:
        lo, hi = lo_hi
        k = _exact_int(v)
        if k is None or not lo <= k <= hi:
            why = f"outside [{lo}, {hi}]" if k is not None else _not_whole(v)
            raise UnrepresentableValueError(
                f"mean_activations[{i}] = {v!r} cannot be held exactly by activations of "
                f"dtype {dtype} ({why}); pass a whole-number mean in [{lo}, {hi}] or cast "
                "the activations to a float dtype"
            )
        return k
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    else:
        if not math.isfinite(f) or _fits_float(f, dtype):
            return f
    raise UnrepresentableValueError(
        f"mean_activations[{i}] = {_short(v)} is too large for activations of dtype {dtype} "
        "(it would become inf); use a wider float dtype"
    )


def _not_whole(v: Any) -> str:
    f = float(v)
    return "NaN" if math.isnan(f) else "infinite" if math.isinf(f) else "not a whole number"


def _fits_float(f: float, dtype: Any) -> bool:
    if isinstance(dtype, np.dtype):
        with np.errstate(over="ignore"):
            return bool(np.isfinite(np.asarray(f, dtype=dtype)))
    import torch

    return bool(torch.isfinite(torch.tensor(f, dtype=torch.float64).to(dtype)))


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} chars)"
