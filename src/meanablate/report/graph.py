"""The circuit of a run as an inline SVG graph (:func:`circuit_svg`), laid out:

- layers left to right, an ``input`` node on the left and an ``output`` node on the right;
- one node per unit (class ``unit``, plus ``in-circuit`` for kept units, ``ground-truth`` for
  units of the known ground truth): heads are circles, MLPs rounded squares, anything else a
  diamond; kept units are filled with their effect's colour (red positive, blue negative) and
  outlined, the rest are grey; ground-truth units get a dashed yellow ring;
- arrows weighted by effect (width: ``|weight|``, colour: sign). With ``edges`` in the
  results they are drawn as given (an endpoint that is not a unit is the input as a source,
  the output as a target). Otherwise each kept unit gets an arrow to every kept unit in a later
  layer, weighted by the target's effect; the input feeds the kept units with no kept unit
  before them and the kept units with no kept unit after them feed the output (weighted by
  their own effect);
- hovering (or focusing) a unit shows its name, effect and interval (an SVG ``<title>`` and a
  small JS tooltip) and highlights its arrows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from meanablate.report.fmt import esc as _e
from meanablate.report.fmt import interval as _interval
from meanablate.report.fmt import num as _num
from meanablate.report.plots import effect_grid

__all__ = ["NEG", "POS", "TRUTH", "circuit_svg"]

POS, NEG, _FAINT = "#c0392b", "#2166ac", "#adb5bd"
TRUTH = "#f2b705"
_SHORT = {
    "head": "H",
    "mlp": "MLP",
    "neuron": "N",
    "attn": "A",
    "resid": "R",
    "position": "P",
    "other": "?",
}


def _effect_color(effect: Any, vmax: float) -> str:
    """A diverging white-to-red / white-to-blue colour for ``effect`` on the scale ``vmax``."""
    if not isinstance(effect, (int, float)) or not math.isfinite(effect) or vmax <= 0:
        return "#dee2e6"
    t = min(abs(effect) / vmax, 1.0) ** 0.7
    lo = (0xF7, 0xF7, 0xF7)
    hi = (0xB2, 0x18, 0x2B) if effect >= 0 else (0x21, 0x66, 0xAC)
    r, g, b = (round(a + (c - a) * t) for a, c in zip(lo, hi))
    return f"#{r:02x}{g:02x}{b:02x}"


def _unit_tip(unit: Mapping[str, Any], minimality: Mapping[str, Any] | None) -> str:
    gt = unit["in_ground_truth"]
    lines = [
        unit["name"],
        f"effect: {_num(unit['effect'], signed=True)}",
        f"interval: {_interval(unit['ci'])}",
    ]
    if unit["attribution"] is not None:
        lines.append(f"attribution: {_num(unit['attribution'], signed=True)}")
    if minimality and unit["name"] in minimality:
        lines.append(f"minimality: {_num(minimality[unit['name']])}")
    lines.append(
        ("in circuit" if unit["in_circuit"] else "not in circuit")
        + ("" if gt is None else (" · in ground truth" if gt else " · not in ground truth"))
    )
    return "\n".join(lines)


# -- the circuit graph -----------------------------------------------------------------------
def _node_shape(kind: str, x: float, y: float, r: float, fill: str, stroke: str, sw: float) -> str:
    style = f'fill="{fill}" stroke="{stroke}" stroke-width="{sw:g}"'
    if kind == "head" or kind == "neuron":
        return f'<circle class="shape" cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {style}/>'
    if kind == "mlp":
        return (
            f'<rect class="shape" x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" '
            f'height="{2 * r:.1f}" rx="{r * 0.3:.1f}" {style}/>'
        )
    d = r * 1.2
    points = f"{x:.1f},{y - d:.1f} {x + d:.1f},{y:.1f} {x:.1f},{y + d:.1f} {x - d:.1f},{y:.1f}"
    return f'<polygon class="shape" points="{points}" {style}/>'


def _default_edges(units: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, float]]:
    kept = [(i, u) for i, u in enumerate(units) if u["in_circuit"]]
    edges: list[tuple[str, str, float]] = []
    for i, u in kept:
        later = [(j, v) for j, v in kept if v["layer"] > u["layer"]]
        earlier = [j for j, v in kept if v["layer"] < u["layer"]]
        if not earlier:
            edges.append(("input", f"u{i}", u["effect"]))
        edges.extend((f"u{i}", f"u{j}", v["effect"]) for j, v in later)
        edges.append((f"u{i}", "output", u["effect"]))
    return edges


def _given_edges(
    units: Sequence[Mapping[str, Any]], edges: Sequence[Mapping[str, Any]]
) -> list[tuple[str, str, float]]:
    ids = {u["name"]: f"u{i}" for i, u in enumerate(units)}
    out = []
    for edge in edges:
        source = ids.get(edge["source"], "input")
        target = ids.get(edge["target"], "output")
        if source != target:
            out.append((source, target, edge["weight"]))
    return out


def circuit_svg(results: Mapping[str, Any]) -> str:
    """The circuit as an inline ``<svg id="circuit-graph">`` (see the module docstring)."""
    units = results["units"]
    layers, rows, cells = effect_grid(units, int(results["model"]["n_layers"]))
    n_rows = max(len(rows), 1)
    spacing = 44.0 if n_rows <= 16 else max(14.0, 700.0 / n_rows)
    r = min(15.0, spacing * 0.36)
    io_w, top, pad = 110.0, 46.0, 24.0
    col_w = min(260.0, max(140.0, (1100.0 - 2 * io_w) / max(len(layers), 1)))
    width = 2 * io_w + len(layers) * col_w
    height = top + n_rows * spacing + pad
    # input/output sit between two rows when there is a middle row, so that arrows to them
    # do not run straight through the nodes of that row
    mid_y = top + (n_rows // 2 if n_rows % 2 else n_rows / 2) * spacing

    pos: dict[str, tuple[float, float]] = {
        "input": (io_w / 2 + 8, mid_y),
        "output": (width - io_w / 2 - 8, mid_y),
    }
    for (row, col), i in cells.items():
        pos[f"u{i}"] = (io_w + (col + 0.5) * col_w, top + (row + 0.5) * spacing)

    finite = [abs(u["effect"]) for u in units if math.isfinite(u["effect"])]
    vmax = max(finite, default=1.0) or 1.0
    kept = {f"u{i}" for i, u in enumerate(units) if u["in_circuit"]} | {"input", "output"}
    edges = (
        _given_edges(units, results["edges"])
        if results.get("edges") is not None
        else _default_edges(units)
    )
    wmax = max((abs(w) for *_, w in edges if math.isfinite(w)), default=1.0) or 1.0

    out = [
        f'<svg id="circuit-graph" role="img" aria-labelledby="circuit-graph-title" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}">',
        '<title id="circuit-graph-title">Circuit graph: layers left to right; kept units '
        "highlighted, ground-truth units ringed</title>",
        "<defs>",
    ]
    for name, color in (("pos", POS), ("neg", NEG), ("faint", _FAINT)):
        out.append(
            f'<marker id="arrow-{name}" viewBox="0 0 10 10" refX="9" refY="5" '
            f'markerWidth="9" markerHeight="9" markerUnits="userSpaceOnUse" orient="auto">'
            f'<path d="M0,0 L10,5 L0,10 z" fill="{color}"/></marker>'
        )
    out.append("</defs>")

    # column headers and guides
    for col, layer in enumerate(layers):
        x = io_w + (col + 0.5) * col_w
        out.append(
            f'<rect class="column" x="{x - col_w / 2 + 6:.1f}" y="{top - 30:.1f}" '
            f'width="{col_w - 12:.1f}" height="{height - top + 30 - pad / 2:.1f}" rx="8"/>'
            f'<text class="col-label" x="{x:.1f}" y="{top - 12:.1f}">layer {_e(layer)}</text>'
        )

    # edges, under the nodes
    out.append('<g class="edges">')
    for source, target, weight in edges:
        if source not in pos or target not in pos:
            continue
        (x1, y1), (x2, y2) = pos[source], pos[target]
        x1 += 26 if source == "input" else r
        x2 -= 30 if target == "output" else r + 3
        strong = source in kept and target in kept
        finite_w = math.isfinite(weight)
        frac = abs(weight) / wmax if finite_w else 0.0
        sign = "pos" if not finite_w or weight >= 0 else "neg"
        kind = sign if strong else "faint"
        color = {"pos": POS, "neg": NEG, "faint": _FAINT}[kind]
        dx = max((x2 - x1) * 0.45, 20.0)
        label = f"{_e(_name_of(units, source))} → {_e(_name_of(units, target))}"
        out.append(
            f'<path class="edge edge-{kind}" data-source="{source}" data-target="{target}" '
            f'd="M{x1:.1f},{y1:.1f} C{x1 + dx:.1f},{y1:.1f} {x2 - dx:.1f},{y2:.1f} '
            f'{x2:.1f},{y2:.1f}" fill="none" stroke="{color}" '
            f'stroke-width="{0.8 + 5.2 * frac:.2f}" stroke-opacity="{0.3 + 0.6 * frac:.2f}" '
            f'marker-end="url(#arrow-{kind})"><title>{label}: weight '
            f"{_e(_num(weight, signed=True))}</title></path>"
        )
    out.append("</g>")

    # input / output nodes
    for node, text in (("input", "input"), ("output", "output")):
        x, y = pos[node]
        out.append(
            f'<g class="io" id="n-{node}"><rect x="{x - 30:.1f}" y="{y - 15:.1f}" width="60" '
            f'height="30" rx="15"/><text x="{x:.1f}" y="{y + 4:.1f}">{text}</text></g>'
        )

    # unit nodes
    minimality = results["scores"]["minimality"]
    font = max(7.0, min(11.0, r * 0.75))
    for i, unit in enumerate(units):
        x, y = pos[f"u{i}"]
        classes = ["unit", f"kind-{_e(unit['kind'])}"]
        if unit["in_circuit"]:
            classes.append("in-circuit")
        if unit["in_ground_truth"]:
            classes.append("ground-truth")
        tip = _unit_tip(unit, minimality)
        out.append(
            f'<g class="{" ".join(classes)}" id="u{i}" tabindex="0" '
            f'data-name="{_e(unit["name"])}" data-effect="{_e(_num(unit["effect"], signed=True))}" '
            f'data-tip="{_e(tip)}"><title>{_e(tip)}</title>'
        )
        if unit["in_ground_truth"]:
            out.append(
                f'<circle class="truth-ring" cx="{x:.1f}" cy="{y:.1f}" r="{r * 1.3 + 3:.1f}" '
                f'fill="none" stroke="{TRUTH}" stroke-width="2.5" stroke-dasharray="4 2.5"/>'
            )
        if unit["in_circuit"]:
            shape = _node_shape(
                unit["kind"], x, y, r, _effect_color(unit["effect"], vmax), "#111", 2.4
            )
        else:
            shape = _node_shape(unit["kind"], x, y, r, "#f1f3f5", "#adb5bd", 1.2)
        out.append(shape)
        index = unit["index"]
        short = _SHORT.get(unit["kind"], "?")
        text = short if index is None else f"{short}{index}"
        dark = unit["in_circuit"] and abs(unit["effect"]) > 0.55 * vmax
        fill = ' fill="#fff"' if dark else ""
        out.append(
            f'<text x="{x:.1f}" y="{y + font * 0.35:.1f}" font-size="{font:.1f}"{fill}>'
            f"{_e(text)}</text></g>"
        )
    out.append("</svg>")
    return "\n".join(out)


def _name_of(units: Sequence[Mapping[str, Any]], node: str) -> str:
    if node in ("input", "output"):
        return node
    return units[int(node[1:])]["name"]
