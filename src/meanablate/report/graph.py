"""The circuit of a run as an inline SVG (:func:`circuit_svg`): only what was measured.

- Layers left to right, between an ``input`` and an ``output`` node. The units drawn are the
  kept ones plus the ``top_k`` others with the largest ``|effect|`` (class ``unit``; kept:
  ``in-circuit``; ground truth: ``ground-truth``, a dashed yellow ring); each layer's other
  units are summarised by a count (``+N more``). A layer with many drawn units wraps them
  into sub-columns, and the SVG scales to the page's width, so 512 neurons or GPT-2 small's
  12 x 12 heads fit without scrolling.
- Fill: the unit's importance (``|effect|`` on one sequential scale, whatever the metric's
  sign); a dashed outline marks a unit whose ablation *improves* the metric (its importance
  is negative). Labels are white on dark fills and dark on light ones.
- Arrows only for measured edges (``results["edges"]``) in the circuit (``in_circuit``,
  default true), at most ``MAX_ARROWS`` (the strongest; :func:`drawn_edges`), width by
  ``|weight|``, dashed when the weight is negative; a head's q/k/v inputs meet it a little
  above / at / below its centre. Without them no arrows are drawn: the kept units stand in
  layer order, and the page says that connections were not measured.
- Hovering (or focusing) a unit shows its name, effect, interval and attribution estimate
  (an SVG ``<title>`` and a small JS tooltip) and highlights its measured edges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from meanablate.report.fmt import esc as _e
from meanablate.report.fmt import importance, importance_color, ink_for, interval, num

__all__ = ["MAX_ARROWS", "TOP_K", "TRUTH", "circuit_svg", "drawn_edges", "drawn_units"]

TRUTH = "#d4a106"
TOP_K = 24  # units outside the circuit drawn (by |effect|); the rest are counted
_ROWS = 12  # nodes per sub-column before a layer wraps
MAX_ARROWS = 80  # kept edges drawn (by |weight|); the page states how many more there are
_QKV_DY = {"q": -6.0, "k": 0.0, "v": 6.0}
_SHORT = {
    "head": "H",
    "mlp": "MLP",
    "neuron": "N",
    "attn": "A",
    "resid": "R",
    "position": "P",
    "other": "?",
}


def drawn_units(units: Sequence[Mapping[str, Any]], top_k: int = TOP_K) -> list[int]:
    """Indices of the units the graph draws: every kept one, and the ``top_k`` others with
    the largest ``|effect|``; in the input order."""

    def size(i: int) -> float:
        e = units[i]["effect"]
        return abs(e) if isinstance(e, (int, float)) and math.isfinite(e) else -1.0

    rest = sorted((i for i, u in enumerate(units) if not u["in_circuit"]), key=lambda i: -size(i))
    keep = {i for i, u in enumerate(units) if u["in_circuit"]} | set(rest[:top_k])
    return sorted(keep)


def drawn_edges(
    edges: Sequence[Mapping[str, Any]] | None, max_arrows: int = MAX_ARROWS
) -> list[int]:
    """Indices of the edges the graph draws: those in the circuit, at most ``max_arrows``
    (the largest finite ``|weight|``), in the input order."""
    if not edges:
        return []
    kept = [i for i, e in enumerate(edges) if e.get("in_circuit", True)]

    def size(i: int) -> float:
        w = edges[i]["weight"]
        return abs(w) if math.isfinite(w) else -1.0

    return sorted(sorted(kept, key=lambda i: -size(i))[:max_arrows])


def _unit_tip(unit: Mapping[str, Any], minimality: Mapping[str, Any] | None) -> str:
    gt = unit["in_ground_truth"]
    lines = [
        unit["name"],
        f"effect: {num(unit['effect'], signed=True)}",
        f"interval: {interval(unit['ci'])}",
    ]
    if unit["attribution"] is not None:
        lines.append(f"attribution (estimate): {num(unit['attribution'], signed=True)}")
    if minimality and unit["name"] in minimality:
        lines.append(f"minimality: {num(minimality[unit['name']])}")
    lines.append(
        ("in circuit" if unit["in_circuit"] else "not in circuit")
        + ("" if gt is None else (" · in ground truth" if gt else " · not in ground truth"))
    )
    return "\n".join(lines)


def _shape(kind: str, x: float, y: float, r: float, style: str) -> str:
    if kind in ("head", "neuron"):
        return f'<circle class="shape" cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {style}/>'
    if kind in ("mlp", "attn"):
        return (
            f'<rect class="shape" x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" '
            f'height="{2 * r:.1f}" rx="{r * 0.3:.1f}" {style}/>'
        )
    d = r * 1.2
    points = f"{x:.1f},{y - d:.1f} {x + d:.1f},{y:.1f} {x:.1f},{y + d:.1f} {x - d:.1f},{y:.1f}"
    return f'<polygon class="shape" points="{points}" {style}/>'


def _label(unit: Mapping[str, Any]) -> str:
    short = _SHORT.get(unit["kind"], "?")
    return short if unit["index"] is None else f"{short}{unit['index']}"


def circuit_svg(results: Mapping[str, Any], *, top_k: int = TOP_K) -> str:
    """The circuit as an inline ``<svg id="circuit-graph">`` (see the module docstring)."""
    units = results["units"]
    hib = bool(results["metric"]["higher_is_better"])
    shown = drawn_units(units, top_k)
    edges_in = [results["edges"][i] for i in drawn_edges(results.get("edges"))]
    ids = {u["name"]: f"u{i}" for i, u in enumerate(units)}
    if edges_in:  # endpoints of measured edges are drawn too
        extra = {ids[e[k]] for e in edges_in for k in ("source", "target") if e[k] in ids}
        shown = sorted(set(shown) | {int(x[1:]) for x in extra})

    by_layer: dict[int, list[int]] = {}
    for i in shown:
        by_layer.setdefault(int(units[i]["layer"]), []).append(i)
    hidden: dict[int, int] = {}
    for u in units:
        hidden[int(u["layer"])] = hidden.get(int(u["layer"]), 0) + 1
    for layer, members in by_layer.items():
        hidden[layer] -= len(members)
    layers = sorted(set(by_layer) | {k for k, v in hidden.items() if v})

    cell, r = 40.0, 14.0
    io_w, top, bottom = 90.0, 40.0, 34.0
    cols = {layer: max(1, math.ceil(len(by_layer.get(layer, [])) / _ROWS)) for layer in layers}
    col_w = {layer: max(76.0, cols[layer] * cell + 16) for layer in layers}
    rows = max([min(_ROWS, len(v)) for v in by_layer.values()] + [1])
    width = 2 * io_w + sum(col_w.values())
    height = top + rows * cell + bottom
    mid_y = top + rows * cell / 2

    pos: dict[str, tuple[float, float]] = {
        "input": (io_w / 2, mid_y),
        "output": (width - io_w / 2, mid_y),
    }
    out = [
        f'<svg id="circuit-graph" role="img" aria-labelledby="circuit-graph-title" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" preserveAspectRatio="xMidYMin meet" '
        f'style="width:100%;max-width:{width:.0f}px;height:auto">',
        '<title id="circuit-graph-title">Circuit: kept units in layer order'
        + (", with measured edges" if edges_in else "")
        + "</title>",
        "<defs>"
        '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" '
        'markerHeight="8" markerUnits="userSpaceOnUse" orient="auto">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
    ]
    x0 = io_w
    for layer in layers:
        w = col_w[layer]
        members = sorted(
            by_layer.get(layer, []), key=lambda i: (units[i]["kind"], units[i]["index"] or 0)
        )
        out.append(
            f'<rect class="column" x="{x0 + 4:.1f}" y="{top - 28:.1f}" width="{w - 8:.1f}" '
            f'height="{height - top + 22:.1f}" rx="8"/>'
            f'<text class="col-label" x="{x0 + w / 2:.1f}" y="{top - 12:.1f}">L{_e(layer)}</text>'
        )
        n_cols = cols[layer]
        for j, i in enumerate(members):
            c, rr = divmod(j, _ROWS)
            x = x0 + w / 2 + (c - (n_cols - 1) / 2) * cell
            y = top + (rr + 0.5) * cell
            pos[f"u{i}"] = (x, y)
        if hidden.get(layer):
            out.append(
                f'<text class="more" x="{x0 + w / 2:.1f}" y="{height - 10:.1f}">'
                f"+{hidden[layer]} more</text>"
            )
        x0 += w

    # measured edges only, under the nodes
    out.append('<g class="edges">')
    if edges_in:
        weights = [abs(e["weight"]) for e in edges_in if math.isfinite(e["weight"])]
        wmax = max(weights, default=1.0) or 1.0
        for e in edges_in:
            s = ids.get(e["source"], "input")
            t = ids.get(e["target"], "output")
            if s == t or s not in pos or t not in pos:
                continue
            (x1, y1), (x2, y2) = pos[s], pos[t]
            x1 += 30 if s == "input" else r
            x2 -= 32 if t == "output" else r + 3
            y2 += _QKV_DY.get(e.get("input") or "k", 0.0) if t != "output" else 0.0
            w = e["weight"]
            frac = abs(w) / wmax if math.isfinite(w) else 0.0
            dx = max((x2 - x1) * 0.45, 16.0)
            dash = ' stroke-dasharray="5 3"' if math.isfinite(w) and w < 0 else ""
            out.append(
                f'<path class="edge" data-source="{s}" data-target="{t}" '
                f'd="M{x1:.1f},{y1:.1f} C{x1 + dx:.1f},{y1:.1f} {x2 - dx:.1f},{y2:.1f} '
                f'{x2:.1f},{y2:.1f}" fill="none" stroke="#555" '
                f'stroke-width="{0.8 + 4.2 * frac:.2f}" '
                f'stroke-opacity="{0.35 + 0.6 * frac:.2f}"{dash} marker-end="url(#arrow)">'
                f"<title>{_e(e.get('name') or e['source'] + ' → ' + e['target'])}"
                f"{' (' + _e(e['input']) + ' input)' if e.get('input') else ''}: measured weight "
                f"{_e(num(w, signed=True))}</title></path>"
            )
    out.append("</g>")

    for node in ("input", "output"):
        x, y = pos[node]
        out.append(
            f'<g class="io" id="n-{node}"><rect x="{x - 30:.1f}" y="{y - 14:.1f}" width="60" '
            f'height="28" rx="14"/><text x="{x:.1f}" y="{y + 4:.1f}">{node}</text></g>'
        )

    minimality = results["scores"]["minimality"]
    imp = [importance(u["effect"], hib) for u in units]
    vmax = max((abs(v) for v in imp if math.isfinite(v)), default=1.0) or 1.0
    for i in shown:
        unit = units[i]
        x, y = pos[f"u{i}"]
        classes = ["unit", f"kind-{_e(unit['kind'])}"]
        if unit["in_circuit"]:
            classes.append("in-circuit")
        if unit["in_ground_truth"]:
            classes.append("ground-truth")
        negative = math.isfinite(imp[i]) and imp[i] < 0
        if negative:
            classes.append("helps-when-ablated")
        tip = _unit_tip(unit, minimality)
        out.append(
            f'<g class="{" ".join(classes)}" id="u{i}" tabindex="0" '
            f'data-name="{_e(unit["name"])}" data-effect="{_e(num(unit["effect"], signed=True))}" '
            f'data-tip="{_e(tip)}"><title>{_e(tip)}</title>'
        )
        if unit["in_ground_truth"]:
            out.append(
                f'<circle class="truth-ring" cx="{x:.1f}" cy="{y:.1f}" r="{r + 4:.1f}" '
                f'fill="none" stroke="{TRUTH}" stroke-width="2.5" stroke-dasharray="4 2.5"/>'
            )
        fill = importance_color(abs(imp[i]) / vmax if math.isfinite(imp[i]) else 0.0)
        stroke, sw = ("#111", 2.4) if unit["in_circuit"] else ("#98a2ad", 1.2)
        dash = ' stroke-dasharray="3 2"' if negative else ""
        if not unit["in_circuit"]:
            fill = "#f1f3f5"
        out.append(
            _shape(
                unit["kind"], x, y, r, f'fill="{fill}" stroke="{stroke}" stroke-width="{sw}"{dash}'
            )
        )
        label = _label(unit)
        font = 10.0 if len(label) <= 3 else max(6.0, 10.0 - 1.6 * (len(label) - 3))
        out.append(
            f'<text x="{x:.1f}" y="{y + font * 0.35:.1f}" font-size="{font:.1f}" '
            f'style="fill:{ink_for(fill)}">{_e(label)}</text></g>'
        )
    out.append("</svg>")
    return "\n".join(out)
