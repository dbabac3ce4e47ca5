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
      var lines = (node.getAttribute("data-tip") || "").split("\n");
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
