"""Edge-circuit scores: faithfulness, completeness, AUROC, and MIB's CPR / CMD.

MIB's circuit-localization track (Mueller et al. 2025, "MIB: A Mechanistic
Interpretability Benchmark"; code: ``MIB_circuit_track/evaluation.py``,
``evaluate_area_under_curve``) scores a ranking of edges by the faithfulness of the
circuits made of its top edges at fixed fractions of all edges,
``(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)``: the top
``int(fraction * n_edges)`` edges by ``|score|``, pruned to those on a path from the input
to the logits, everything else ablated. With ``f = (m(C) - m(empty)) / (m(full) -
m(empty))`` at each fraction,

- CPR (circuit performance ratio) = the trapezoid area under ``f`` against the fraction
  (higher is better);
- CMD (circuit-model difference) = the trapezoid area under ``|1 - f|`` (lower is better).

Both use a linear fraction axis (MIB's default, ``log_scale=False``). Circuits export to the
EAP-IG / MIB graph JSON (``cfg``, ``nodes`` with ``in_graph``, ``edges`` with ``score``
and ``in_graph``) that MIB's evaluation loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meanablate.discovery.edges import EdgeData, edge_mask
from meanablate.discovery.evaluate import faithfulness
from meanablate.discovery.graph import Graph
from meanablate.discovery.scores import Scores, auroc
from meanablate.metrics import Metric, get_metric

__all__ = [
    "MIB_PERCENTAGES",
    "EdgeCircuitScores",
    "MIBCurve",
    "edge_auroc",
    "mib_curve",
    "on_paths",
    "score_edge_circuit",
    "to_mib_json",
]

MIB_PERCENTAGES: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class EdgeCircuitScores:
    """Faithfulness ``(m(C) - m(empty)) / (m(full) - m(empty))`` and completeness
    ``(m(full) - m(full minus C)) / (m(full) - m(empty))`` of an edge circuit ``C``."""

    faithfulness: float
    completeness: float
    metric_full: float
    metric_circuit: float
    metric_empty: float
    metric_complement: float
    n_edges: int


def score_edge_circuit(
    data: EdgeData, kept: Iterable[str], metric: str | Metric
) -> EdgeCircuitScores:
    """Score the edge circuit ``kept`` (every other edge ablated) on ``data``."""
    m = get_metric(metric)
    graph = data.graph
    keep = edge_mask(graph, kept).bool()
    full = float(data.metric_of(torch.zeros(len(graph)), m).mean())
    empty = float(data.metric_of(torch.ones(len(graph)), m).mean())
    circuit = float(data.metric_of((~keep).float(), m).mean())
    complement = float(data.metric_of(keep.float(), m).mean())
    denom = full - empty
    complete = (full - complement) / denom if denom else float("nan")
    return EdgeCircuitScores(
        faithfulness(circuit, full, empty),
        complete,
        full,
        circuit,
        empty,
        complement,
        int(keep.sum()),
    )


def edge_auroc(scores: Scores | Mapping[str, float], truth: Iterable[str]) -> float:
    """AUROC of ``|score|`` against the ground-truth edges (ties count one half)."""
    d = scores.as_dict() if isinstance(scores, Scores) else dict(scores)
    truth = set(truth)
    missing = truth - set(d)
    if missing:
        raise ValueError(f"ground-truth edges without a score: {sorted(missing)}")
    names = list(d)
    return auroc([abs(d[n]) for n in names], [n in truth for n in names])


def on_paths(graph: Graph, kept: Iterable[str]) -> list[str]:
    """The edges of ``kept`` that lie on a path from ``input`` to ``logits`` through
    kept edges (MIB prunes top-n circuits this way: a dangling edge carries nothing)."""
    kept_edges = [graph.edge(n) for n in kept]
    reach = {"input"}
    for e in sorted(kept_edges, key=lambda e: e.dst_index):  # forward order
        if e.src in reach:
            reach.add(e.dst)
    useful = {"logits"}
    for e in sorted(kept_edges, key=lambda e: -e.dst_index):  # backward order
        if e.dst in useful:
            useful.add(e.src)
    return [e.name for e in kept_edges if e.src in reach and e.dst in useful]


@dataclass(frozen=True)
class MIBCurve:
    """Faithfulness at MIB's circuit sizes, and the integrated scores."""

    percentages: tuple[float, ...]
    edge_counts: list[int]
    faithfulness: list[float]
    cpr: float
    cmd: float


def mib_curve(
    data: EdgeData,
    scores: Scores | Mapping[str, float],
    metric: str | Metric,
    *,
    percentages: Sequence[float] = MIB_PERCENTAGES,
    absolute: bool = True,
) -> MIBCurve:
    """CPR and CMD of a ranking of the graph's edges, as MIB computes them."""
    m = get_metric(metric)
    d = scores.as_dict() if isinstance(scores, Scores) else dict(scores)
    graph = data.graph
    missing = set(graph.names) - set(d)
    if missing:
        raise ValueError(f"{len(missing)} edges have no score, e.g. {sorted(missing)[:3]}")
    pct = [float(p) for p in percentages]
    if sorted(pct) != pct or not pct or pct[0] < 0 or pct[-1] > 1:
        raise ValueError(f"percentages must rise within [0, 1], got {percentages}")
    key = (lambda n: -abs(d[n])) if absolute else (lambda n: -d[n])
    ranking = sorted(graph.names, key=key)
    full = float(data.metric_of(torch.zeros(len(graph)), m).mean())
    empty = float(data.metric_of(torch.ones(len(graph)), m).mean())
    counts, faiths = [], []
    for p in pct:
        kept = on_paths(graph, ranking[: int(p * len(graph))])
        mask = torch.ones(len(graph))
        if kept:
            mask[graph.indices(kept)] = 0
        value = float(data.metric_of(mask, m).mean())
        counts.append(len(kept))
        faiths.append(faithfulness(value, full, empty))
    cpr = cmd = 0.0
    for i in range(len(pct) - 1):
        width = pct[i + 1] - pct[i]
        cpr += width * (faiths[i] + faiths[i + 1]) / 2
        cmd += width * (abs(1 - faiths[i]) + abs(1 - faiths[i + 1])) / 2
    return MIBCurve(tuple(pct), counts, faiths, cpr, cmd)


def to_mib_json(
    graph: Graph,
    scores: Scores | Mapping[str, float],
    kept: Iterable[str] | None = None,
    path: str | Path | None = None,
    *,
    d_model: int | None = None,
) -> dict[str, Any]:
    """The EAP-IG / MIB circuit file: every edge's score and whether it is in the circuit
    (``kept``; default: every edge with a score), nodes in the circuit if an edge of it
    touches them. Written to ``path`` as JSON when given."""
    d = scores.as_dict() if isinstance(scores, Scores) else dict(scores)
    keep = set(graph.names if kept is None else kept)
    graph.indices(list(keep))  # every name checked
    nodes_in = {"input", "logits"}
    for name in keep:
        e = graph.edge(name)
        nodes_in.update((e.src, e.dst))
    node_names = [n.name for n in graph.srcs] + ["logits"]
    out = {
        "cfg": {
            "n_layers": graph.n_layers,
            "n_heads": graph.n_heads,
            "parallel_attn_mlp": graph.parallel,
            "d_model": d_model,
        },
        "nodes": {n: {"in_graph": n in nodes_in} for n in node_names},
        "edges": {
            e.name: {"score": float(d.get(e.name, 0.0)), "in_graph": e.name in keep}
            for e in graph.edges
        },
    }
    if path is not None:
        Path(path).write_text(json.dumps(out, indent=1))
    return out
