"""The self-contained ``report.html`` of a discovery run.

One file, no external resources (a Content-Security-Policy forbids any fetch): inline CSS and
JS, plots as base64 PNGs, and the circuit as an inline SVG graph:

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

All strings from the results are HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from meanablate.report.plots import effect_grid

__all__ = ["circuit_svg", "render_html"]

_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)
_POS, _NEG, _FAINT = "#c0392b", "#2166ac", "#adb5bd"
_TRUTH = "#f2b705"
_SHORT = {
    "head": "H",
    "mlp": "MLP",
    "neuron": "N",
    "attn": "A",
    "resid": "R",
    "position": "P",
    "other": "?",
}


# -- formatting ------------------------------------------------------------------------------
def _e(value: Any) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def _num(x: Any, *, signed: bool = False, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+∞" if x > 0 else "−∞"
    sign = "+" if signed else ""
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 10 ** (-digits)):
        return f"{x:{sign}.{digits}g}"
    if round(x, digits) == 0:
        return f"{0:.{digits}f}"
    return f"{x:{sign}.{digits}f}"


def _interval(ci: Sequence[float] | None) -> str:
    return "—" if ci is None else f"[{_num(ci[0])}, {_num(ci[1])}]"


def _seconds(s: float) -> str:
    if not isinstance(s, (int, float)) or not math.isfinite(s):
        return _num(s)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{int(s // 60)} min {s % 60:04.1f} s"


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
    for name, color in (("pos", _POS), ("neg", _NEG), ("faint", _FAINT)):
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
        color = {"pos": _POS, "neg": _NEG, "faint": _FAINT}[kind]
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
                f'fill="none" stroke="{_TRUTH}" stroke-width="2.5" stroke-dasharray="4 2.5"/>'
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


# -- the page --------------------------------------------------------------------------------
_STYLE = """
:root { --ink:#1d232a; --muted:#5f6b76; --line:#e3e7eb; --card:#f7f9fb; --accent:#1f6fb4; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 2px; } h2 { font-size: 18px; margin: 32px 0 10px; }
.sub { color: var(--muted); margin: 0 0 18px; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
        padding: 12px 14px; }
.tile .v { font-size: 26px; font-weight: 650; font-variant-numeric: tabular-nums; }
.tile .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.tile .d { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 5px 12px 5px 0; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
table.summary > tbody > tr > th { width: 210px; }
table.summary table td, table.summary table th { padding: 2px 16px 2px 0; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 16px;
         align-items: start; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 10px;
         padding: 8px; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 12px; padding: 4px 4px 0; }
.graph-wrap { overflow-x: auto; border: 1px solid var(--line); border-radius: 10px;
              background: #fcfdfe; }
#circuit-graph { display: block; margin: 0 auto; font-family: inherit; }
#circuit-graph .column { fill: #f3f5f8; }
#circuit-graph .col-label { text-anchor: middle; fill: var(--muted); font-size: 12px;
                            font-weight: 600; }
#circuit-graph text { text-anchor: middle; pointer-events: none; fill: #333; }
#circuit-graph .io rect { fill: #343a40; } #circuit-graph .io text { fill: #fff; font-size: 12px; }
#circuit-graph .unit { cursor: pointer; outline: none; }
#circuit-graph .unit:not(.in-circuit) text { fill: #868e96; }
#circuit-graph .unit.in-circuit text { font-weight: 700; }
#circuit-graph .unit:hover .shape, #circuit-graph .unit:focus .shape { stroke: #f08c00;
                                                                       stroke-width: 3; }
#circuit-graph .edge { transition: stroke-opacity .12s; }
#circuit-graph.focus .edge { stroke-opacity: .07; }
#circuit-graph.focus .edge.hl { stroke-opacity: 1; }
.legend { display: flex; flex-wrap: wrap; gap: 18px; color: var(--muted); font-size: 12px;
          margin: 8px 2px; align-items: center; }
.legend svg { vertical-align: middle; margin-right: 4px; }
#tooltip { position: fixed; z-index: 10; pointer-events: none; background: #1d232a; color: #fff;
           padding: 7px 10px; border-radius: 6px; font-size: 12px; max-width: 420px;
           box-shadow: 0 4px 14px rgba(0,0,0,.25); }
#tooltip .t-name { font: 600 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
                   margin-bottom: 3px; word-break: break-all; }
#tooltip[hidden] { display: none; }
.bar { display: inline-block; height: 9px; border-radius: 2px; vertical-align: middle;
       margin-right: 6px; }
td.num { text-align: right; } th.sortable { cursor: pointer; user-select: none; }
th.sortable::after { content: " ↕"; color: #adb5bd; }
.yes { color: #2b8a3e; font-weight: 700; } .no { color: #adb5bd; }
details { margin-top: 12px; } summary { cursor: pointer; font-weight: 600; }
pre { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px;
      overflow: auto; font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
"""

_SCRIPT = """
(function () {
  "use strict";
  var svg = document.getElementById("circuit-graph");
  var tip = document.getElementById("tooltip");
  if (svg && tip) {
    var place = function (x, y) {
      var w = tip.offsetWidth, h = tip.offsetHeight;
      var left = Math.min(x + 14, window.innerWidth - w - 8);
      var top = y + 14 + h > window.innerHeight ? y - h - 10 : y + 14;
      tip.style.left = Math.max(4, left) + "px";
      tip.style.top = Math.max(4, top) + "px";
    };
    var show = function (node, x, y) {
      var lines = (node.getAttribute("data-tip") || "").split("\\n");
      tip.textContent = "";
      lines.forEach(function (line, i) {
        var div = document.createElement("div");
        if (i === 0) { div.className = "t-name"; }
        div.textContent = line;
        tip.appendChild(div);
      });
      tip.hidden = false;
      place(x, y);
      svg.classList.add("focus");
      svg.querySelectorAll(".edge").forEach(function (e) {
        var hit = e.getAttribute("data-source") === node.id ||
                  e.getAttribute("data-target") === node.id;
        e.classList.toggle("hl", hit);
      });
    };
    var hide = function () {
      tip.hidden = true;
      svg.classList.remove("focus");
    };
    svg.addEventListener("mouseover", function (ev) {
      var node = ev.target.closest(".unit");
      if (node) { show(node, ev.clientX, ev.clientY); }
    });
    svg.addEventListener("mousemove", function (ev) {
      if (!tip.hidden) { place(ev.clientX, ev.clientY); }
    });
    svg.addEventListener("mouseout", function (ev) {
      var node = ev.target.closest(".unit");
      if (node && !node.contains(ev.relatedTarget)) { hide(); }
    });
    svg.addEventListener("focusin", function (ev) {
      var node = ev.target.closest(".unit");
      if (node) {
        var box = node.getBoundingClientRect();
        show(node, box.right, box.top);
      }
    });
    svg.addEventListener("focusout", hide);
  }
  var table = document.getElementById("units-table");
  if (table) {
    table.querySelectorAll("th.sortable").forEach(function (th) {
      th.addEventListener("click", function () {
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var idx = th.cellIndex, dir = th.getAttribute("data-dir") === "asc" ? -1 : 1;
        th.setAttribute("data-dir", dir === 1 ? "asc" : "desc");
        rows.sort(function (a, b) {
          var x = a.cells[idx].getAttribute("data-sort");
          var y = b.cells[idx].getAttribute("data-sort");
          var nx = parseFloat(x), ny = parseFloat(y);
          if (!isNaN(nx) && !isNaN(ny)) { return dir * (nx - ny); }
          return dir * String(x).localeCompare(String(y));
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  }
})();
"""


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
