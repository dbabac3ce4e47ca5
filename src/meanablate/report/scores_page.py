"""What the page of a ``sweep`` / ``attribute`` run shows (:func:`scores_context`), and the
results-like object its heat map is drawn from (:func:`heatmap_results`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from markupsafe import Markup

from meanablate.report.fmt import interval, num

__all__ = ["heatmap_results", "scores_context"]


def _higher_is_better(metric: str) -> bool:
    from meanablate.metrics import get_metric

    try:
        return bool(get_metric(metric).higher_is_better)
    except (KeyError, ValueError):
        return False


def heatmap_results(scores: Mapping[str, Any]) -> dict[str, Any]:
    """A results-like dict (model, metric, units) for the heat map (``plot_effects``)."""
    from meanablate.results.build import unit_row

    rows = []
    for u in scores["units"]:
        row = unit_row(u["name"])
        row.update(effect=u["effect"], ci=u.get("ci"), attribution=None, in_circuit=False,
                   in_ground_truth=None)  # fmt: skip
        rows.append(row)
    return {
        "effect_source": "sweep" if scores["method"] == "sweep" else "attribution",
        "model": {
            "name": scores.get("name", "model"),
            "n_layers": max([r["layer"] + 1 for r in rows] + [0]),
        },
        "metric": {
            "name": scores["metric"],
            "higher_is_better": _higher_is_better(scores["metric"]),
        },
        "units": rows,
    }


def scores_context(scores: Mapping[str, Any], exact: Mapping[str, Any] | None) -> dict[str, Any]:
    """Title, tiles, caveats and the units table of a scores page."""
    from meanablate.report.parts import TABLE_ROWS, rank_correlation

    method, metric = scores["method"], scores["metric"]
    units = scores["units"]
    estimate = method != "sweep"
    exact_of = {u["name"]: u["effect"] for u in exact["units"]} if exact else {}
    kind = "attribution (estimates)" if estimate else "sweep (exact effects)"
    tiles = [
        {"key": "method", "value": method, "small": "", "detail": kind, "text": True},
        {"key": "metric", "value": metric, "small": "", "detail": "", "text": True},
        {"key": "units", "value": str(len(units)), "small": "", "detail": ""},
        {"key": "examples", "value": str(scores.get("n_examples", "—")), "small": "", "detail": ""},
        {"key": "run time", "value": num(scores.get("seconds")) + " s", "small": "", "detail": ""},
    ]
    caveats = []
    if estimate:
        text = (
            "These values are attribution estimates of each unit's effect (a gradient "
            "approximation from one forward and one backward pass), not exact ablations."
        )
        rc = rank_correlation(
            [u["effect"] for u in units], [exact_of.get(u["name"]) for u in units]
        )
        if rc is not None:
            tiles.append({"key": "rank corr.", "value": f"{rc[0]:.3f}", "small": "",
                          "detail": f"Spearman with the exact sweep, {rc[1]} units"})  # fmt: skip
            text += f" Spearman rank correlation with the exact sweep: {rc[0]:.3f}."
            n_exact = exact.get("n_examples") if exact else None
            n_here = scores.get("n_examples")
            if n_exact is not None and n_here is not None and n_exact != n_here:
                text += (
                    f" (The sweep ran on {n_exact} examples, the attribution on {n_here}: "
                    "they compare different data.)"
                )
        caveats.append(text)

    def size(u: Mapping[str, Any]) -> float:
        v = u["effect"]
        return abs(v) if isinstance(v, (int, float)) and math.isfinite(v) else -1.0

    order = sorted(units, key=lambda u: -size(u))[:TABLE_ROWS]
    value_label = "attribution (estimate)" if estimate else "effect"
    headers = [("unit", True), ("rank", True), (value_label, True), ("interval", False)]
    if exact_of:
        headers.append(("exact effect", True))
    rows = []
    for rank, u in enumerate(order, start=1):
        row = [
            {"html": Markup("<code>{}</code>").format(u["name"]), "sort": u["name"], "cls": ""},
            {"html": rank, "sort": rank, "cls": "num"},
            {"html": num(u["effect"], signed=True), "sort": u["effect"], "cls": "num"},
            {"html": interval(u.get("ci")), "sort": None, "cls": "nowrap"},
        ]
        if exact_of:
            e = exact_of.get(u["name"])
            row.append({"html": num(e, signed=True), "sort": "" if e is None else e, "cls": "num"})
        rows.append(row)
    left = len(units) - len(order)
    return {
        "title": f"{'Attribution' if estimate else 'Sweep'} — {scores.get('name', 'model')}",
        "subtitle": f"metric {metric} · {len(units)} units · {kind}",
        "tiles": tiles,
        "caveats": caveats,
        "units_table": {
            "summary": f"{len(units)} units by |{value_label}|",
            "headers": [{"label": h, "sortable": s} for h, s in headers],
            "rows": rows,
            "more": f"{left} more units are in the JSON file." if left else "",
        },
    }
