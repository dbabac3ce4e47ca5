"""``results.json`` of an edge circuit: :func:`edge_results`.

An edge run's page is the node report with the measured edges on it:

- ``units``: the graph's heads and MLPs, each with its exact ablation effect on the same
  data and source (every edge out of the node ablated together, which is the node ablation:
  its readers all see the ablated value); ``effect_source`` is ``"sweep"``.
- ``circuit.units``: the nodes the kept edges touch.
- ``edges``: every kept edge with its score (signed, in the metric's units, as
  :func:`~meanablate.discover_edges` measured it) and the ``top_k`` strongest other edges;
  ``edges_left_out``: how many measured edges are not listed.

One implementation with the node runs: this calls
:func:`~meanablate.results.build.discovery_results`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["EDGE_TOP_K", "edge_records", "edge_results", "is_edge_circuit", "node_effects"]

EDGE_TOP_K = 24  # edges outside the circuit listed (by |score|); the rest are counted


def is_edge_circuit(circuit: Any) -> bool:
    """Whether ``circuit``'s units are edges (``"src->dst"``) rather than sites."""
    units = list(getattr(circuit, "units", []))
    return bool(units) and all("->" in u for u in units)


def _endpoint(graph: Any, node: str, io: str) -> str:
    unit = graph.unit(node)
    return io if unit is None else unit


def edge_records(
    graph: Any,
    scores: Mapping[str, float],
    kept: Iterable[str],
    *,
    top_k: int = EDGE_TOP_K,
    ground_truth: Iterable[str] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """``(edges, left_out)``: the ``results.json`` edge objects of the kept edges and of the
    ``top_k`` other edges with the largest finite non-zero ``|score|`` (graph order), and how many
    scored edges are not listed.

    >>> from meanablate.discovery.graph import build_graph
    >>> g = build_graph(1, 1, False)
    >>> s = {n: 0.0 for n in g.names} | {"a0.h0->logits": -0.5, "input->a0.h0<k>": 0.25}
    >>> recs, left = edge_records(g, s, ["a0.h0->logits"], top_k=1)
    >>> [(r["source"], r["target"], r["weight"], r["in_circuit"]) for r in recs], left
    ([('input', 'blocks.0.attn.hook_z[heads=0]', 0.25, False), \
('blocks.0.attn.hook_z[heads=0]', 'output', -0.5, True)], 3)
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    kept_set = set(kept)
    graph.indices(sorted(kept_set))  # each checked: a clear error for an unknown edge
    truth = set(ground_truth) if ground_truth is not None else None

    def finite(name: str) -> bool:
        v = scores.get(name)
        return isinstance(v, (int, float)) and math.isfinite(v)

    # an edge whose ablation changed nothing is not worth an arrow: only non-zero ones
    rest = sorted(
        (n for n in graph.names if n not in kept_set and finite(n) and scores[n]),
        key=lambda n: -abs(scores[n]),
    )
    listed = {n for n in kept_set if finite(n)} | set(rest[:top_k])
    out = []
    for e in graph.edges:
        if e.name not in listed:
            continue
        rec: dict[str, Any] = {
            "source": _endpoint(graph, e.src, "input"),
            "target": _endpoint(graph, e.dst, "output"),
            "weight": float(scores[e.name]),
            "name": e.name,
            "input": e.qkv,
            "in_circuit": e.name in kept_set,
        }
        if truth is not None:
            rec["in_ground_truth"] = e.name in truth
        out.append(rec)
    n_scored = sum(1 for e in graph.edges if e.name in scores or e.name in kept_set)
    return out, n_scored - len(out)


def node_effects(data: Any, metric: Any) -> Any:
    """Exact ablation effects of every head and MLP of ``data``'s graph
    (:class:`~meanablate.Scores` over node units, ``per_example [n_nodes, n_examples]``):
    each node's outgoing edges all ablated, the metric's effect as in a node sweep."""
    import time

    from meanablate.discovery.edges import edge_mask
    from meanablate.discovery.scores import Scores
    from meanablate.metrics import get_metric

    t0 = time.perf_counter()
    m = get_metric(metric)
    graph = data.graph
    nodes = [n for n in graph.srcs if n.kind != "input"]
    rows = []
    with torch.inference_mode():
        bound = [m.bind(item.batch, item.clean) for item in data.items]
        for node in nodes:
            mask = edge_mask(graph, [e.name for e in graph.edges_from(node.name)])
            rows.append(
                torch.cat(
                    [
                        f(data.logits(item, mask)).double().cpu()
                        for item, f in zip(data.items, bound)
                    ]
                )
            )
    units = [graph.unit(n.name) for n in nodes]
    per_example = torch.stack(rows) if rows else torch.zeros(0, data.n_examples)
    return Scores.from_examples(units, per_example, m.name, "sweep", time.perf_counter() - t0)


def edge_results(
    circuit: Any,
    data: Any,
    *,
    circuit_scores: Any = None,
    ground_truth: Iterable[str] | None = None,
    top_k: int = EDGE_TOP_K,
    n_boot: int = 1000,
    seed: int = 0,
    node_scores: Any = None,
    notes: str | None = None,
    **context: Any,
) -> dict[str, Any]:
    """A validated ``results.json`` object for the edge circuit ``circuit`` (from
    :func:`~meanablate.discover_edges`) on ``data`` (its
    :class:`~meanablate.discovery.EdgeData`).

    ``circuit_scores``: :func:`~meanablate.discovery.score_edge_circuit`'s result (computed
    when absent); ``ground_truth``: the true edges (their nodes are the units' ground truth);
    ``top_k``: how many edges outside the circuit to list; ``node_scores``: the node effects
    if already measured (:func:`node_effects`); ``context``: the keywords of
    :func:`~meanablate.results.build.discovery_results` (``name=``, ``config=`` ...).

    >>> import torch, meanablate as ma
    >>> from meanablate.discovery import EdgeData
    >>> from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
    >>> cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=1, d_head=4, d_vocab=5, n_ctx=4)
    >>> model = HookedTransformer(cfg)
    >>> data = EdgeData(model, [torch.tensor([[1, 2, 3], [3, 2, 1]])], "zero")
    >>> c = ma.discover_edges(model, data, algorithm="sweep", target_faithfulness=1.0)
    >>> r = edge_results(c, data, n_boot=0)
    >>> sorted(e["name"] for e in r["edges"] if e["in_circuit"]) == sorted(c.kept)
    True
    """
    from meanablate.discovery.circuit import Circuit
    from meanablate.discovery.mib import score_edge_circuit
    from meanablate.results.build import discovery_results, unit_cis

    if not is_edge_circuit(circuit):
        raise ValueError(
            "edge_results needs an edge circuit (units like 'a0.h1->logits'); got units "
            f"{list(circuit.units)[:3]}: use discovery_results for a node circuit"
        )
    graph = data.graph
    cs = (
        circuit_scores
        if circuit_scores is not None
        else score_edge_circuit(data, circuit.kept, circuit.metric)
    )
    nodes = node_scores if node_scores is not None else node_effects(data, circuit.metric)
    truth = list(ground_truth) if ground_truth is not None else None
    edges, left_out = edge_records(
        graph, circuit.scores, circuit.kept, top_k=top_k, ground_truth=truth
    )

    def touched(names: Iterable[str]) -> list[str]:
        hit = set()
        for name in names:
            e = graph.edge(name)
            hit.update(u for u in (graph.unit(e.src), graph.unit(e.dst)) if u is not None)
        return [u for u in nodes.units if u in hit]

    node_circuit = Circuit(
        circuit.algorithm,
        list(nodes.units),
        touched(circuit.kept),
        nodes.as_dict(),
        circuit.metric,
        cs.metric_full,
        cs.metric_circuit,
        cs.metric_empty,
        threshold=circuit.threshold,
        target_faithfulness=circuit.target_faithfulness,
        curve=list(circuit.curve),
        seconds=circuit.seconds,
        abs_threshold=circuit.abs_threshold,
        mean_kind=circuit.mean_kind,
        behaviour=cs.metric_full - cs.metric_empty,
    )
    scores = SimpleNamespace(
        faithfulness=cs.faithfulness,
        faithfulness_ci=None,
        completeness=cs.completeness,
        minimality=None,
        metric_full=cs.metric_full,
        metric_circuit=cs.metric_circuit,
        metric_empty=cs.metric_empty,
    )
    text = (
        f"Edge circuit: {len(circuit.kept)} of {len(graph)} edges kept "
        f"({circuit.algorithm}); arrows are the kept edges with their measured scores"
        + ("; the faithfulness curve counts edges" if circuit.curve else "")
        + ". Unit effects are node ablations (all of a node's edges ablated)."
    )
    results = discovery_results(
        node_circuit,
        sweep=nodes,
        circuit_scores=scores,
        cis=unit_cis(nodes.per_example, n_boot, seed),
        ground_truth=touched(truth) if truth else None,
        seed=seed,
        notes=text if not notes else f"{notes}\n{text}",
        edges=edges,
        edges_left_out=left_out,
        **context,
    )
    return results
