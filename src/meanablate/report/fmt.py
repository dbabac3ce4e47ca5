"""How the report page writes values: HTML-escaped text, numbers, intervals and durations."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["esc", "interval", "num", "seconds"]


def esc(value: Any) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def num(x: Any, *, signed: bool = False, digits: int = 3) -> str:
    """A number to ``digits`` places (``—`` for none; ``NaN``, ``±∞``; tiny or huge: ``g``)."""
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+∞" if x > 0 else "−∞"
    sign = "+" if signed else ""
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 10 ** (-digits)):
        return f"{x:{sign}.{digits}g}"
    if round(x, digits) == 0:
        return f"{0:.{digits}f}"
    return f"{x:{sign}.{digits}f}"


def interval(ci: Sequence[float] | None) -> str:
    """``[lo, hi]`` (``—``: none)."""
    return "—" if ci is None else f"[{num(ci[0])}, {num(ci[1])}]"


def seconds(s: float) -> str:
    """A duration: ``850 ms``, ``12.34 s``, ``3 min 05.0 s``."""
    if not isinstance(s, (int, float)) or not math.isfinite(s):
        return num(s)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{int(s // 60)} min {s % 60:04.1f} s"
