"""The self-contained ``report.html`` of a discovery run.

One file, no external resources (a Content-Security-Policy forbids any fetch): inline CSS and
JS, plots as base64 PNGs, and the circuit as an inline SVG graph.

Modules: :mod:`~meanablate.report.graph` (the SVG circuit graph: see there for its layout),
:mod:`~meanablate.report.static` (CSS, JS, Content-Security-Policy),
:mod:`~meanablate.report.fmt` (numbers and escaping).

All strings from the results are HTML-escaped.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import Any

from meanablate.report.fmt import esc as _e
from meanablate.report.fmt import interval as _interval
from meanablate.report.fmt import num as _num
from meanablate.report.fmt import seconds as _seconds
from meanablate.report.graph import NEG as _NEG
from meanablate.report.graph import POS as _POS
from meanablate.report.graph import TRUTH as _TRUTH
from meanablate.report.graph import circuit_svg
from meanablate.report.static import CSP as _CSP
from meanablate.report.static import SCRIPT as _SCRIPT
from meanablate.report.static import STYLE as _STYLE

__all__ = ["circuit_svg", "render_html"]


def _tile(key: str, value: str, detail: str = "") -> str:
    d = f'<div class="d">{detail}</div>' if detail else ""
    return f'<div class="tile"><div class="k">{key}</div><div class="v">{value}</div>{d}</div>'


def _legend() -> str:
    def icon(body: str) -> str:
        return f'<svg width="26" height="22" viewBox="0 0 26 22" aria-hidden="true">{body}</svg>'

    items = [
        (
            icon('<circle cx="13" cy="11" r="8" fill="#e8a39a" stroke="#111" stroke-width="2"/>'),
            "kept head (fill: effect)",
        ),
        (
            icon(
                '<rect x="5" y="3" width="16" height="16" rx="4" fill="#c9def0" stroke="#111" '
                'stroke-width="2"/>'
            ),
            "kept MLP (blue: negative)",
        ),
        (icon('<circle cx="13" cy="11" r="8" fill="#f1f3f5" stroke="#adb5bd"/>'), "not kept"),
        (
            icon(
                f'<circle cx="13" cy="11" r="9" fill="none" stroke="{_TRUTH}" stroke-width="2.5" '
                'stroke-dasharray="4 2.5"/>'
            ),
            "ground truth",
        ),
        (
            icon('<polygon points="13,2 22,11 13,20 4,11" fill="#f1f3f5" stroke="#adb5bd"/>'),
            "other unit kind",
        ),
        (
            icon(
                f'<path d="M1,11 H20" stroke="{_POS}" stroke-width="3"/><path d="M18,6 L25,11 '
                f'L18,16 z" fill="{_POS}"/>'
            ),
            "arrow: weight (width), sign (colour)",
        ),
    ]
    return '<div class="legend">' + "".join(f"<span>{a}{b}</span>" for a, b in items) + "</div>"


def _key(value: Any) -> str:
    return "" if value is None else str(value)


def _units_table(results: Mapping[str, Any]) -> str:
    units = results["units"]
    minimality = results["scores"]["minimality"] or {}
    finite = [abs(u["effect"]) for u in units if math.isfinite(u["effect"])]
    vmax = max(finite, default=1.0) or 1.0
    order = sorted(
        range(len(units)),
        key=lambda i: -abs(units[i]["effect"]) if math.isfinite(units[i]["effect"]) else 0.0,
    )

    def flag(value: bool | None) -> tuple[str, str]:
        if value is None:
            return "", '<span class="no">—</span>'
        return ("1", '<span class="yes">✓</span>') if value else ("0", '<span class="no">·</span>')

    rows = []
    for i in order:
        u = units[i]
        effect = u["effect"]
        width = 60 * abs(effect) / vmax if math.isfinite(effect) else 0
        color = _POS if effect >= 0 else _NEG
        bar = f'<span class="bar" style="width:{width:.0f}px;background:{color}"></span>'
        c_key, c_val = flag(u["in_circuit"])
        g_key, g_val = flag(u["in_ground_truth"])
        mini = minimality.get(u["name"])
        rows.append(
            "<tr>"
            f'<td data-sort="{_e(u["name"])}"><code>{_e(u["name"])}</code></td>'
            f'<td class="num" data-sort="{_e(u["layer"])}">{_e(u["layer"])}</td>'
            f'<td data-sort="{_e(u["kind"])}">{_e(u["kind"])}</td>'
            f'<td class="num" data-sort="{_e(effect)}">{bar}{_e(_num(effect, signed=True))}</td>'
            f"<td>{_e(_interval(u['ci']))}</td>"
            f'<td class="num" data-sort="{_e(_key(u["attribution"]))}">'
            f"{_e(_num(u['attribution'], signed=True))}</td>"
            f'<td class="num" data-sort="{_e(_key(mini))}">{_e(_num(mini))}</td>'
            f'<td data-sort="{c_key}">{c_val}</td><td data-sort="{g_key}">{g_val}</td>'
            "</tr>"
        )
    head = "".join(
        f'<th class="sortable">{h}</th>' if s else f"<th>{h}</th>"
        for h, s in (
            ("unit", True),
            ("layer", True),
            ("kind", True),
            ("effect", True),
            ("interval", False),
            ("attribution", True),
            ("minimality", True),
            ("circuit", True),
            ("truth", True),
        )
    )
    return (
        f'<table id="units-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _summary(results: Mapping[str, Any]) -> tuple[str, str]:
    model, metric, circuit = results["model"], results["metric"], results["circuit"]
    scores, units, timings = results["scores"], results["units"], results["timings"]
    n_kept, n_units = len(circuit["units"]), len(units)
    labelled = [u for u in units if u["in_ground_truth"] is not None]
    truth = [u for u in labelled if u["in_ground_truth"]]
    found = sum(1 for u in truth if u["in_circuit"])
    extra = sum(1 for u in labelled if u["in_circuit"] and not u["in_ground_truth"])
    phases = {k: v for k, v in timings.items() if k != "total"}
    total_time = timings.get("total", sum(phases.values()))
    direction = "higher is better" if metric["higher_is_better"] else "lower is better"
    faith_ci = scores["faithfulness_ci"]

    tiles = [
        _tile(
            "faithfulness",
            _e(_num(scores["faithfulness"])),
            _e(_interval(faith_ci)) if faith_ci else "",
        ),
        _tile("circuit size", f"{n_kept}<small> / {n_units}</small>", "units kept"),
        _tile("completeness", _e(_num(scores["completeness"]))),
        _tile(
            "AUROC",
            _e(_num(scores["auroc"])),
            f"{found}/{len(truth)} true units found, {extra} extra"
            if labelled
            else "no ground truth",
        ),
        _tile("run time", _e(_seconds(total_time)), f"{len(phases)} phases"),
    ]
    threshold = "" if circuit["threshold"] is None else f", threshold {_num(circuit['threshold'])}"
    timing_rows = "".join(
        f"<tr><td>{_e(k)}</td><td class='num'>{_e(_seconds(v))}</td></tr>"
        for k, v in phases.items()
    )
    rows = [
        (
            "model",
            f"<b>{_e(model['name'])}</b> <code>{_e(model['class'])}</code>, "
            f"{_e(model['n_layers'])} layers",
        ),
        ("metric", f"<b>{_e(metric['name'])}</b> ({direction})"),
        ("circuit", f"{n_kept} of {n_units} units — {_e(circuit['algorithm'])}{_e(threshold)}"),
        (
            "metric: full / circuit / empty",
            " / ".join(
                _e(_num(circuit[k])) for k in ("metric_full", "metric_circuit", "metric_empty")
            ),
        ),
        (
            "faithfulness",
            f"{_e(_num(scores['faithfulness']))} {_e(_interval(faith_ci))}"
            if faith_ci
            else _e(_num(scores["faithfulness"])),
        ),
        ("completeness", _e(_num(scores["completeness"]))),
        (
            "AUROC",
            _e(_num(scores["auroc"])) if scores["auroc"] is not None else "— (no ground truth)",
        ),
        (
            "timings",
            f"<table>{timing_rows}<tr><th>total</th>"
            f"<th class='num'>{_e(_seconds(total_time))}</th></tr></table>"
            if timings
            else "—",
        ),
        ("seed", _e(results["seed"])),
        ("created", _e(results["created"])),
    ]
    table = (
        '<table class="summary">'
        + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
        + "</table>"
    )
    return '<div class="tiles">' + "".join(tiles) + "</div>", table


_CAPTIONS = {
    "effects": "Effect of mean-ablating each unit alone. Outlined: kept in the circuit; "
    "yellow mark: ground truth.",
    "faithfulness": "Faithfulness as units are added; the star is the discovered circuit.",
    "roc": "Unit scores against the ground truth; the star is the discovered circuit.",
}


def render_html(results: Mapping[str, Any], images: Mapping[str, bytes] | None = None) -> str:
    """The report page as a string. ``images`` maps plot names (``effects``,
    ``faithfulness``, ``roc``) to PNG bytes, embedded as base64 ``data:`` URIs."""
    images = images or {}
    model = results["model"]
    title = results.get("title") or f"Circuit report — {model['name']}"
    tiles, summary = _summary(results)
    figures = "".join(
        f'<figure><img alt="{_e(key)} plot" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode("ascii")}"><figcaption>{_e(_CAPTIONS.get(key, key))}'
        "</figcaption></figure>"
        for key, data in images.items()
    )
    notes = results.get("notes")
    notes_html = f"<p>{_e(notes)}</p>" if notes else ""
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in results["versions"].items())
    config = json.dumps(results["config"], indent=2, ensure_ascii=False, default=str)
    n_kept = len(results["circuit"]["units"])
    empty_note = '<p class="sub">The circuit is empty: no unit was kept.</p>' if n_kept == 0 else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="meanablate {_e(results["meanablate_version"])}">
<link rel="icon" href="data:,">
<title>{_e(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<main>
<h1>{_e(title)}</h1>
<p class="sub">{_e(model["name"])} · metric <b>{_e(results["metric"]["name"])}</b> ·
{_e(results["circuit"]["algorithm"])} · {_e(results["created"])}</p>
{notes_html}
{tiles}
<h2>Circuit</h2>
{empty_note}
<div class="graph-wrap">
{circuit_svg(results)}
</div>
{_legend()}
<h2>Plots</h2>
<div class="plots">{figures or '<p class="sub">No plots.</p>'}</div>
<h2>Summary</h2>
{summary}
<h2>Units</h2>
<details open><summary>{len(results["units"])} units (click a column to sort)</summary>
{_units_table(results)}
</details>
<details><summary>Config</summary><pre>{_e(config)}</pre></details>
<footer>meanablate {_e(results["meanablate_version"])} · {versions} ·
schema v{_e(results["schema_version"])}</footer>
</main>
<div id="tooltip" role="tooltip" hidden></div>
<script>{_SCRIPT}</script>
</body>
</html>
"""
