"""Parts of the report page: the graph's legend (only what it shows), the units table, and
the rank correlation of attribution estimates with exact effects."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup

from meanablate.report.fmt import interval as _interval
from meanablate.report.fmt import num as _num
from meanablate.report.graph import TRUTH, drawn_units

__all__ = ["TABLE_ROWS", "legend", "rank_correlation", "units_table"]

TABLE_ROWS = 300  # units listed in the table (kept ones first, then by |effect|)


def _icon(body: str) -> Markup:
    return Markup(
        f'<svg width="26" height="22" viewBox="0 0 26 22" aria-hidden="true">{body}</svg>'
    )


def rank_correlation(a: Sequence[Any], b: Sequence[Any]) -> tuple[float, int] | None:
    """Spearman's rank correlation of the pairs where both are finite, and their count."""
    pairs = [
        (x, y)
        for x, y in zip(a, b)
        if isinstance(x, (int, float)) and isinstance(y, (int, float))
        and math.isfinite(x) and math.isfinite(y)
    ]  # fmt: skip
    if len(pairs) < 3:
        return None
    from scipy.stats import spearmanr

    rho = float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)
    return (rho, len(pairs)) if math.isfinite(rho) else None


def legend(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Legend entries for what the graph shows, and nothing else."""
    units = results["units"]
    drawn = [units[i] for i in drawn_units(units)]
    hib = bool(results["metric"]["higher_is_better"])
    items = []
    kinds = {u["kind"] for u in drawn if u["in_circuit"]}
    shapes = {
        "head": ('<circle cx="13" cy="11" r="8" fill="#f08c32" stroke="#111" stroke-width="2"/>',
                 "kept head"),
        "neuron": ('<circle cx="13" cy="11" r="8" fill="#f08c32" stroke="#111" stroke-width="2"/>',
                   "kept neuron"),
        "mlp": ('<rect x="5" y="3" width="16" height="16" rx="4" fill="#f08c32" stroke="#111" '
                'stroke-width="2"/>', "kept MLP"),
        "attn": ('<rect x="5" y="3" width="16" height="16" rx="4" fill="#f08c32" stroke="#111" '
                 'stroke-width="2"/>', "kept attention layer"),
    }  # fmt: skip
    other = (
        '<polygon points="13,2 22,11 13,20 4,11" fill="#f08c32" stroke="#111" stroke-width="2"/>'
    )
    for kind in sorted(kinds):
        body, label = shapes.get(kind, (other, f"kept {kind} unit"))
        items.append({"icon": _icon(body), "label": label})
    if drawn:
        items.append(
            {
                "icon": Markup('<span class="swatch"></span>'),
                "label": "fill: importance (|effect|, "
                + ("−effect" if hib else "effect")
                + " > 0 hurts the metric)",
            }
        )
    if any(not u["in_circuit"] for u in drawn):
        items.append(
            {
                "icon": _icon('<circle cx="13" cy="11" r="8" fill="#f1f3f5" stroke="#98a2ad"/>'),
                "label": "not kept (largest effects only)",
            }
        )
    from meanablate.report.fmt import importance

    if any(
        math.isfinite(importance(u["effect"], hib)) and importance(u["effect"], hib) < 0
        for u in drawn
    ):
        items.append(
            {
                "icon": _icon(
                    '<circle cx="13" cy="11" r="8" fill="#fff" stroke="#111" stroke-width="2" '
                    'stroke-dasharray="3 2"/>'
                ),
                "label": "dashed: ablating it improves the metric",
            }
        )
    if any(u["in_ground_truth"] for u in drawn):
        items.append(
            {
                "icon": _icon(
                    f'<circle cx="13" cy="11" r="9" fill="none" stroke="{TRUTH}" '
                    'stroke-width="2.5" stroke-dasharray="4 2.5"/>'
                ),
                "label": "ground truth",
            }
        )
    if results.get("edges"):
        items.append(
            {
                "icon": _icon('<path d="M1,11 H20" stroke="#555" stroke-width="3"/>'
                              '<path d="M18,6 L25,11 L18,16 z" fill="#555"/>'),
                "label": "measured edge (width: |weight|; dashed: negative)",
            }
        )  # fmt: skip
    return items


def _flag(value: bool | None) -> dict[str, Any]:
    if value is None:
        return {"html": Markup('<span class="no">—</span>'), "sort": "", "cls": ""}
    if value:
        return {"html": Markup('<span class="yes">✓</span>'), "sort": "1", "cls": ""}
    return {"html": Markup('<span class="no">·</span>'), "sort": "0", "cls": ""}


def _cell(text: Any, sort: Any = None, cls: str = "num") -> dict[str, Any]:
    return {
        "html": text,
        "sort": None if sort is None else ("" if sort is None else sort),
        "cls": cls,
    }


def _table_order(units: Sequence[Mapping[str, Any]], key: str = "effect") -> list[int]:
    def size(i: int) -> float:
        v = units[i].get(key)
        return abs(v) if isinstance(v, (int, float)) and math.isfinite(v) else -1.0

    kept = [i for i, u in enumerate(units) if u.get("in_circuit")]
    rest = sorted(
        (i for i, u in enumerate(units) if not u.get("in_circuit")), key=lambda i: -size(i)
    )
    kept.sort(key=lambda i: -size(i))
    return (kept + rest)[: max(TABLE_ROWS, len(kept))]


def units_table(results: Mapping[str, Any]) -> dict[str, Any]:
    units = results["units"]
    minimality = results["scores"]["minimality"] or {}
    source = results.get("effect_source") or "sweep"
    effect_label = "effect" if source == "sweep" else f"{source} score"
    has_attr = any(u["attribution"] is not None for u in units)
    headers = [("unit", True), ("layer", True), ("kind", True), (effect_label, True),
               ("interval", False)]  # fmt: skip
    if has_attr:
        headers.append(("attribution (estimate)", True))
    headers += [("minimality", True), ("circuit", True), ("truth", True)]
    rows = []
    order = _table_order(units)
    for i in order:
        u = units[i]
        row = [
            _cell(Markup("<code>{}</code>").format(u["name"]), u["name"], ""),
            _cell(u["layer"], u["layer"]),
            _cell(u["kind"], u["kind"], ""),
            _cell(_num(u["effect"], signed=True), u["effect"]),
            _cell(_interval(u["ci"]), None, "nowrap"),
        ]
        if has_attr:
            a = u["attribution"]
            row.append(_cell(_num(a, signed=True), "" if a is None else a))
        mini = minimality.get(u["name"])
        row += [_cell(_num(mini), "" if mini is None else mini), _flag(u["in_circuit"]),
                _flag(u["in_ground_truth"])]  # fmt: skip
        rows.append(row)
    left = len(units) - len(order)
    return {
        "summary": f"{len(units)} units",
        "headers": [{"label": h, "sortable": s} for h, s in headers],
        "rows": rows,
        "more": f"{left} more units with smaller effects are in results.json." if left else "",
    }
