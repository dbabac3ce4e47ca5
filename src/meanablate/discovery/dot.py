"""Graphviz DOT for circuits: measured edges with their weights and signs.

An edge circuit draws its kept edges, each labelled with its score (the evidence the
algorithm used), blue for a positive score and red for a negative one, the width growing
with ``|score|``; ``top_k`` keeps the strongest and says how many were left out. A node
circuit draws its units with the edges between them that the node circuit implies
(dashed: they were not measured one by one).
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["circuit_to_dot"]

_NODE_RE = re.compile(r"^(input|logits|a\d+\.h\d+|m\d+)$")


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _rank(node: str) -> tuple[int, int]:
    if node == "input":
        return (-1, 0)
    if node == "logits":
        return (10**9, 0)
    m = re.match(r"^a(\d+)\.h(\d+)$", node)
    if m:
        return (2 * int(m.group(1)), int(m.group(2)))
    m = re.match(r"^m(\d+)$", node)
    if m:
        return (2 * int(m.group(1)) + 1, 0)
    return (10**8, 0)


def circuit_to_dot(circuit: Any, *, top_k: int | None = None, title: str | None = None) -> str:
    """DOT source for ``circuit`` (a :class:`~meanablate.discovery.Circuit` over edges or
    nodes). ``top_k``: draw only the ``k`` kept edges with the largest ``|score|``.

    >>> from meanablate.discovery.prune import Circuit
    >>> c = Circuit("acdc", ["input->a0.h0<v>", "a0.h0->logits"], ["a0.h0->logits"],
    ...             {"input->a0.h0<v>": 0.0, "a0.h0->logits": -0.5}, "kl", 0.0, 0.0, 1.0)
    >>> print(c.to_dot().splitlines()[-2])
      "a0.h0" -> "logits" [label="-0.5", color="#c0392b", penwidth=4.00];
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    kept = list(circuit.kept)
    is_edges = all("->" in u for u in circuit.units)
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, fontname="Helvetica"];']
    label = title or f"{circuit.algorithm} circuit ({circuit.metric})"
    if is_edges:
        scores = {k: float(circuit.scores.get(k, float("nan"))) for k in kept}
        order = sorted(kept, key=lambda k: -abs(scores[k]) if math.isfinite(scores[k]) else 0)
        shown = order if top_k is None else order[:top_k]
        left = len(kept) - len(shown)
        if left:
            label += f"; {left} more kept edges not drawn"
        lines.append(f"  label={_quote(label)};")
        biggest = max((abs(scores[k]) for k in shown if math.isfinite(scores[k])), default=0.0)
        edges = []
        nodes = {"input", "logits"}
        for name in shown:
            src, rest = name.split("->", 1)
            dst, _, qkv = rest.partition("<")
            nodes.update((src, dst))
            s = scores[name]
            color = "#2e86c1" if s >= 0 else "#c0392b"
            width = 1.0 + 3.0 * (abs(s) / biggest if biggest > 0 and math.isfinite(s) else 0.0)
            text = f"{s:.3g}" + (f" ({qkv.rstrip('>')})" if qkv else "")
            edges.append(
                f"  {_quote(src)} -> {_quote(dst)} "
                f"[label={_quote(text)}, color={_quote(color)}, penwidth={width:.2f}];"
            )
        lines += [f"  {_quote(n)};" for n in sorted(nodes, key=_rank)]
        lines += edges
    else:
        from meanablate.discovery.graph import unit_node

        lines.append(f"  label={_quote(label)};")
        names = []
        for u in kept:
            try:
                names.append(unit_node(u))
            except ValueError:
                names.append(u)
        nodes = ["input", *sorted(set(names), key=_rank), "logits"]
        lines += [f"  {_quote(n)};" for n in nodes]
        graph_nodes = [n for n in nodes if _NODE_RE.match(n)]
        for i, a in enumerate(graph_nodes):
            for b in graph_nodes[i + 1 :]:
                if _rank(a)[0] < _rank(b)[0] and not (a == "input" and b == "logits"):
                    lines.append(f"  {_quote(a)} -> {_quote(b)} [style=dashed];")
    lines.append("}")
    return "\n".join(lines) + "\n"
