"""How result objects show themselves: one mixin for the text repr, the notebook table
and the DataFrame, all rendered by :mod:`meanablate.results.views` (imported on use, so
defining a result class imports neither pandas nor the views)."""

from __future__ import annotations

from typing import Any

__all__ = ["Shown"]


class Shown:
    """``repr()`` fits one screen, ``_repr_html_`` is a Jupyter table, ``to_dataframe()`` a
    pandas DataFrame. Dataclasses using it must pass ``repr=False`` (theirs would win)."""

    __slots__ = ()

    def __repr__(self) -> str:
        from meanablate.results.views import text

        return text(self)

    def _repr_html_(self) -> str:
        from meanablate.results.views import html

        return html(self)

    def to_dataframe(self) -> Any:
        """A pandas DataFrame (the ``pandas`` extra: ``pip install 'meanablate[pandas]'``):
        one row per unit for Scores, Circuit and CircuitScores' kept units, per site for
        Means (shape, tokens, mean abs), per example for Effect."""
        from meanablate.results.views import frame

        return frame(self)
