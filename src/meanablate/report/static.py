"""The report page's fixed parts: its Content-Security-Policy, CSS and JS (the tooltip and
highlighted arrows of the circuit graph, the sortable units table)."""

from __future__ import annotations

__all__ = ["CSP", "SCRIPT", "STYLE"]

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)

STYLE = """
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

SCRIPT = """
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
