"""How the report writes values: significant digits, intervals, durations, and the one colour
meaning of the page, *importance*.

Importance is the effect oriented by the metric: ablating an important unit hurts the
metric, so importance is ``-effect`` for a metric where higher is better (``logit_diff``,
``accuracy``) and ``effect`` where lower is better (``loss``; ``kl`` / ``l2`` distances,
which are never negative). Colour shows ``|importance|`` on one sequential scale; a negative
importance (ablating the unit *improves* the metric) is marked separately, never by hue.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "esc",
    "importance",
    "importance_color",
    "ink_for",
    "interval",
    "num",
    "seconds",
]


def esc(value: Any) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def num(x: Any, *, signed: bool = False, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits (``—`` for none; ``NaN``, ``±∞``).

    >>> num(0.0012345), num(1.42, signed=True), num(-12.345), num(123456.0), num(2e-9)
    ('0.00123', '+1.42', '-12.3', '123456', '2e-09')
    """
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+∞" if x > 0 else "−∞"
    sign = "+" if signed else ""
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    if -5 <= magnitude < 6:
        decimals = max(0, digits - 1 - magnitude)
        text = f"{x:{sign}.{decimals}f}"
        return text
    return f"{x:{sign}.{digits}g}"


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


def importance(effect: Any, higher_is_better: bool) -> float:
    """The effect oriented so that positive means "ablating it hurts the metric".

    >>> importance(-2.0, True), importance(0.5, False)
    (2.0, 0.5)
    """
    if not isinstance(effect, (int, float)) or isinstance(effect, bool):
        return math.nan
    return -float(effect) if higher_is_better else float(effect)


# a sequential scale (light yellow -> orange -> dark red-brown), readable in grey too
_STOPS = ((0.0, (0xFF, 0xF7, 0xE0)), (0.5, (0xF0, 0x8C, 0x32)), (1.0, (0x7F, 0x25, 0x04)))


def importance_color(t: float) -> str:
    """The fill of importance ``t`` in ``[0, 1]`` (a fraction of the largest)."""
    t = min(max(t, 0.0), 1.0) if math.isfinite(t) else 0.0
    for (a, ca), (b, cb) in itertools.pairwise(_STOPS):
        if t <= b:
            f = (t - a) / (b - a)
            r, g, bl = (round(x + (y - x) * f) for x, y in zip(ca, cb))
            return f"#{r:02x}{g:02x}{bl:02x}"
    return "#7f2504"


def ink_for(fill: str) -> str:
    """Black or white text, whichever contrasts more with ``fill`` (``#rrggbb``)."""
    r, g, b = (int(fill[i : i + 2], 16) / 255 for i in (1, 3, 5))

    def lin(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    lum = 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)
    return "#ffffff" if (1.05 / (lum + 0.05)) > ((lum + 0.05) / 0.05) else "#111111"
