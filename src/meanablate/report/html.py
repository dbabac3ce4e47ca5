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
from meanablate.report.graph import circuit_svg
from meanablate.report.parts import legend as _legend
from meanablate.report.parts import rank_correlation
from meanablate.report.parts import units_table as _units_table
from meanablate.report.static import CSP, script, style

__all__ = ["circuit_svg", "render_html", "render_scores_html"]

_CAPTIONS = {
    "effects": "Importance of each unit alone (orange: ablating it hurts the metric; purple: "
    "ablating it helps). Outlined: kept in the circuit; yellow mark: ground truth.",
    "faithfulness": "Faithfulness as units are added by |effect|; the star is the circuit.",
    "roc": "Unit scores against the ground truth; the star is the discovered circuit.",
    "estimates": "Attribution estimates against exact effects, one point per unit.",
}


_SCORES_CAPTIONS = {
    "effects": "Importance of each unit alone (orange: ablating it hurts the metric; purple: "
    "ablating it helps); for an attribution, estimated.",
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


def _figures(
    images: Mapping[str, bytes],
    links: Mapping[str, Sequence[str]],
    captions: Mapping[str, str] | None = None,
) -> list[dict]:
    captions = _CAPTIONS if captions is None else captions
    return [
        {
            "key": key,
            "uri": "data:image/png;base64," + base64.b64encode(data).decode("ascii"),
            "caption": captions.get(key, key),
            "links": list(links.get(key, ())),
        }
        for key, data in images.items()
    ]


def _edges_caveat(results: Mapping[str, Any]) -> str:
    from meanablate.report.graph import drawn_edges

    edges = results["edges"]
    kept = sum(1 for e in edges if e.get("in_circuit", True))
    drawn = len(drawn_edges(edges))
    listed_out = len(edges) - kept
    unlisted = results.get("edges_left_out") or 0
    text = f"The arrows are {drawn} of the circuit's {kept} measured edges"
    text += " (the strongest)" if drawn < kept else ""
    if listed_out or unlisted:
        text += f"; {listed_out + unlisted} measured edges outside the circuit are not drawn" + (
            f" ({listed_out} of them listed in results.json)" if listed_out else ""
        )
    return text + "."


def _caveats(results: Mapping[str, Any]) -> list[str]:
    units, scores = results["units"], results["scores"]
    out = []
    if not results.get("edges"):
        out.append(
            "Connections between units were not measured (no edge discovery was run): the "
            "graph shows the kept units in layer order, without arrows."
        )
    else:
        out.append(_edges_caveat(results))
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
    # the circuit's notes explain its faithfulness; the scores' notes also explain
    # completeness and minimality outside [0, 1] (the same faithfulness note only once)
    notes: list[str] = []
    for group in (circuit.get("notes"), scores.get("notes")):
        for n in group if isinstance(group, list) else []:
            if isinstance(n, str) and n not in notes:
                notes.append(n)
    if notes:
        out.extend(f"{n}." for n in notes)
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
    edges = results.get("edges") or []
    if any("in_circuit" in e for e in edges):  # an edge run: its size is in edges
        kept = sum(1 for e in edges if e.get("in_circuit", True))
        n_edges = len(edges) + (results.get("edges_left_out") or 0)
        detail = f"edges kept ({len(circuit['units'])} of {len(units)} units)"
        tiles[1].update(value=str(kept), small=f"/ {n_edges}", detail=detail)
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
            figures=_figures(images or {}, links or {}, _SCORES_CAPTIONS),
            config=json.dumps(scores.get("config", {}), indent=2, ensure_ascii=False, default=str),
            versions="",
            schema_version=None,
            notes=None,
            **ctx,
        )
    )
