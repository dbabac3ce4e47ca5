"""The self-contained ``report.html`` of a run, rendered from Jinja2 templates.

One file, no external resources (a Content-Security-Policy forbids any fetch): inline CSS and
JS, plots as base64 PNGs (their SVG and PDF copies are linked, beside the page), and the
circuit as an inline SVG. Templates are package data (``meanablate/report/templates``) and
rendered with autoescaping on: every string from the results is escaped.

:func:`render_html` draws a discovery run (``results.json``); :func:`render_scores_html` a
``sweep`` or ``attribute`` run (``sweep.json`` / ``attribution.json``). Modules:
:mod:`~meanablate.report.graph` (the circuit SVG), :mod:`~meanablate.report.static` (CSS, JS,
CSP), :mod:`~meanablate.report.fmt` (numbers, importance colours).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from markupsafe import Markup

from meanablate.report.fmt import interval as _interval
from meanablate.report.fmt import num as _num
from meanablate.report.fmt import seconds as _seconds
from meanablate.report.graph import TRUTH, circuit_svg, drawn_units
from meanablate.report.static import CSP, script, style

__all__ = ["TABLE_ROWS", "circuit_svg", "rank_correlation", "render_html", "render_scores_html"]

TABLE_ROWS = 300  # units listed in the table (kept ones first, then by |effect|)

_CAPTIONS = {
    "effects": "Importance of each unit alone (orange: ablating it hurts the metric; purple: "
    "ablating it helps). Outlined: kept in the circuit; yellow mark: ground truth.",
    "faithfulness": "Faithfulness as units are added by |effect|; the star is the circuit.",
    "roc": "Unit scores against the ground truth; the star is the discovered circuit.",
    "estimates": "Attribution estimates against exact effects, one point per unit.",
}


@lru_cache(maxsize=1)
def _env() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("meanablate.report", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )


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


def _figures(images: Mapping[str, bytes], links: Mapping[str, Sequence[str]]) -> list[dict]:
    return [
        {
            "key": key,
            "uri": "data:image/png;base64," + base64.b64encode(data).decode("ascii"),
            "caption": _CAPTIONS.get(key, key),
            "links": list(links.get(key, ())),
        }
        for key, data in images.items()
    ]


def _legend(results: Mapping[str, Any]) -> list[dict[str, Any]]:
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


def _units_table(results: Mapping[str, Any]) -> dict[str, Any]:
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


def _caveats(results: Mapping[str, Any]) -> list[str]:
    units, scores = results["units"], results["scores"]
    out = []
    if not results.get("edges"):
        out.append(
            "Connections between units were not measured (no edge discovery was run): the "
            "graph shows the kept units in layer order, without arrows."
        )
    source = results.get("effect_source") or "sweep"
    if source == "attribution":
        out.append(
            "The effects shown are attribution estimates (a gradient approximation), not "
            "exact ablations."
        )
    elif source != "sweep":
        out.append(
            f"The per-unit values are the {source} algorithm's own scores (the metric change "
            "when the unit was tried during pruning), not single-unit ablation effects."
        )
    attr = [u["attribution"] for u in units]
    if any(a is not None for a in attr):
        rc = rank_correlation([u["effect"] for u in units], attr) if source == "sweep" else None
        text = (
            "Attribution is an estimate of each unit's effect (one forward and one backward pass)"
        )
        if rc is not None:
            text += (
                f"; its Spearman rank correlation with the exact effect is {rc[0]:.3f} over "
                f"{rc[1]} units"
            )
        out.append(text + ".")
    circuit = results["circuit"]
    if circuit.get("certificate_text"):
        out.append(f"Minimality certificate — {circuit['certificate_text']}.")
    notes = circuit.get("notes")
    if isinstance(notes, list) and notes:
        out.extend(f"{n}." for n in notes if isinstance(n, str))
        return out
    faith = scores["faithfulness"]
    if isinstance(faith, (int, float)) and math.isfinite(faith) and not 0 <= faith <= 1:
        out.append(
            f"Faithfulness {_num(faith)} lies outside [0, 1]: the circuit moves the metric "
            "beyond the full model (above 1) or beyond the empty circuit (below 0); with a full "
            "and empty metric close together the ratio is unstable."
        )
    return out


def _tiles(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    circuit, scores, units = results["circuit"], results["scores"], results["units"]
    labelled = [u for u in units if u["in_ground_truth"] is not None]
    truth = [u for u in labelled if u["in_ground_truth"]]
    found = sum(1 for u in truth if u["in_circuit"])
    extra = sum(1 for u in labelled if u["in_circuit"] and not u["in_ground_truth"])
    timings = results["timings"]
    phases = {k: v for k, v in timings.items() if k != "total"}
    total = timings.get("total", sum(phases.values()))
    faith_ci = scores["faithfulness_ci"]
    tiles = [
        {"key": "faithfulness", "value": _num(scores["faithfulness"]), "small": "",
         "detail": _interval(faith_ci) if faith_ci else ""},
        {"key": "circuit size", "value": str(len(circuit["units"])), "small": f"/ {len(units)}",
         "detail": "units kept"},
        {"key": "completeness", "value": _num(scores["completeness"]), "small": "", "detail": ""},
    ]  # fmt: skip
    certificate = circuit.get("certificate")
    if certificate is not None:
        tiles.append({"key": "certificate", "value": str(certificate), "small": "",
                      "detail": "minimality proven" if certificate != "none" else "not minimised",
                      "text": True})  # fmt: skip
    tiles += [
        {"key": "AUROC", "value": _num(scores["auroc"]), "small": "",
         "detail": f"{found}/{len(truth)} true units found, {extra} extra" if labelled
         else "no ground truth"},
        {"key": "run time", "value": _seconds(total), "small": "",
         "detail": f"{len(phases)} phases"},
    ]  # fmt: skip
    return tiles


def _summary(results: Mapping[str, Any]) -> list[tuple[str, Any]]:
    model, metric, circuit = results["model"], results["metric"], results["circuit"]
    scores, timings = results["scores"], results["timings"]
    phases = {k: v for k, v in timings.items() if k != "total"}
    total = timings.get("total", sum(phases.values()))
    direction = "higher is better" if metric["higher_is_better"] else "lower is better"
    how = circuit["algorithm"]
    if circuit.get("threshold") is not None:
        how += f", threshold {_num(circuit['threshold'])}"
    for key, label in (("threshold_kind", "threshold"), ("mean_kind", "means"),
                       ("certificate", "certificate")):  # fmt: skip
        value = circuit.get(key, results.get(key))
        if value is not None:
            how += f", {label}: {value}"
    timing_table = Markup("<table>{}<tr><th>total</th><th class='num'>{}</th></tr></table>").format(
        Markup("").join(
            Markup("<tr><td>{}</td><td class='num'>{}</td></tr>").format(k, _seconds(v))
            for k, v in phases.items()
        ),
        _seconds(total),
    )
    faith_ci = scores["faithfulness_ci"]
    return [
        ("model", Markup("<b>{}</b> <code>{}</code>, {} layers").format(
            model["name"], model["class"], model["n_layers"])),
        ("metric", Markup("<b>{}</b> ({})").format(metric["name"], direction)),
        ("circuit", f"{len(circuit['units'])} of {len(results['units'])} units — {how}"),
        ("metric: full / circuit / empty",
         " / ".join(_num(circuit[k]) for k in ("metric_full", "metric_circuit", "metric_empty"))),
        ("faithfulness", f"{_num(scores['faithfulness'])} {_interval(faith_ci)}" if faith_ci
         else _num(scores["faithfulness"])),
        ("completeness", _num(scores["completeness"])),
        ("AUROC", _num(scores["auroc"]) if scores["auroc"] is not None
         else "— (no ground truth)"),
        ("timings", timing_table if timings else "—"),
        ("seed", results["seed"]),
        ("created", results["created"]),
    ]  # fmt: skip


def render_html(
    results: Mapping[str, Any],
    images: Mapping[str, bytes] | None = None,
    links: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The report page of a discovery run as a string. ``images`` maps plot names
    (``effects``, ``faithfulness``, ``roc``) to PNG bytes, embedded as ``data:`` URIs;
    ``links`` maps them to the file names of their SVG / PDF copies beside the page."""
    model = results["model"]
    title = results.get("title") or f"Circuit report — {model['name']}"
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    return (
        _env()
        .get_template("report.html.j2")
        .render(
            csp=CSP,
            style=Markup(style()),
            script=Markup(script()),
            version=results["meanablate_version"],
            title=title,
            subtitle=f"{model['name']} · metric {results['metric']['name']} · "
            f"{results['circuit']['algorithm']} · {results['created']}",
            notes=results.get("notes"),
            tiles=_tiles(results),
            caveats=_caveats(results),
            empty=not results["circuit"]["units"],
            graph=Markup(circuit_svg(results)),
            legend=_legend(results),
            figures=_figures(images or {}, links or {}),
            summary=_summary(results),
            units_table=_units_table(results),
            config=json.dumps(results["config"], indent=2, ensure_ascii=False, default=str),
            versions=versions,
            schema_version=results["schema_version"],
        )
    )


def render_scores_html(
    scores: Mapping[str, Any],
    images: Mapping[str, bytes] | None = None,
    links: Mapping[str, Sequence[str]] | None = None,
    *,
    exact: Mapping[str, Any] | None = None,
    version: str = "",
) -> str:
    """The page of a ``sweep`` / ``attribute`` run (a ``sweep.json`` / ``attribution.json``
    object). ``exact``: the sweep's object beside an attribution's: its effects are shown
    next to the estimates, with their rank correlation."""
    from meanablate.report.scores_page import scores_context

    ctx = scores_context(scores, exact)
    return (
        _env()
        .get_template("scores.html.j2")
        .render(
            csp=CSP,
            style=Markup(style()),
            script=Markup(script()),
            version=version,
            figures=_figures(images or {}, links or {}),
            config=json.dumps(scores.get("config", {}), indent=2, ensure_ascii=False, default=str),
            versions="",
            schema_version=None,
            notes=None,
            **ctx,
        )
    )
