"""The report page's fixed parts: its Content-Security-Policy, and the CSS and JS shipped as
package data beside the templates (``templates/report.css``, ``templates/report.js``: the
tooltip and highlighted edges of the circuit graph, the sortable units table)."""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = ["CSP", "script", "style"]

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)


@cache
def _read(name: str) -> str:
    return resources.files("meanablate.report").joinpath("templates", name).read_text("utf-8")


def style() -> str:
    """The page's CSS."""
    return _read("report.css")


def script() -> str:
    """The page's JS."""
    return _read("report.js")
