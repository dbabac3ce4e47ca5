"""Short text and HTML views of results: one screen, whatever the number of units.

Text reprs give the headline numbers and at most :data:`TOP` units (by ``|value|``);
``_repr_html_`` tables (Jupyter) show the same, rendered by a Jinja2 template with
autoescaping, so unit names cannot inject markup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

__all__ = ["TOP", "html_table", "sig", "top_units"]

TOP = 8  # units listed in a repr


def sig(x: Any, digits: int = 3, *, signed: bool = False) -> str:
    """``x`` to ``digits`` significant digits (``nan``, ``inf``; ``None``: ``-``).

    >>> sig(0.0012345), sig(-12.3456), sig(1234567.0), sig(0.1, signed=True)
    ('0.00123', '-12.3', '1.23e+06', '+0.1')
    """
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    text = f"{x:.{digits}g}"
    if signed and x > 0:
        text = "+" + text
    return text


def top_units(units: Sequence[str], values: Sequence[float], k: int = TOP) -> list[int]:
    """Indices of the ``k`` units with the largest ``|value|`` (ties: input order)."""
    order = sorted(
        range(len(units)),
        key=lambda i: -abs(values[i]) if math.isfinite(values[i]) else 0.0,
    )
    return order[:k]


@lru_cache(maxsize=1)
def _template() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("meanablate.report", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("repr.html.j2")


def html_table(
    title: str,
    facts: Sequence[tuple[str, Any]],
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    more: int = 0,
) -> str:
    """An HTML card: a title, ``facts`` (label, value), a table (``more``: rows left out)."""
    return _template().render(
        title=title,
        facts=list(facts),
        headers=list(headers),
        rows=[list(r) for r in rows],
        more=more,
    )
