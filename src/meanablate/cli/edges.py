"""``meanablate edges``: an edge circuit, its scores, and MIB / graphviz files.

Writes into the run folder ``results.json`` and ``report.html`` (as ``discover`` does; the
graph draws the kept edges with their scores), ``edges.json`` (every edge's score, the
circuit, faithfulness, completeness, edge AUROC against the organism's true edges, MIB's
CPR / CMD of the ranking), ``circuit.dot`` and ``mib_circuit.json`` (the EAP-IG / MIB circuit file).
``--algorithm`` maps onto the edge algorithms: ``acdc`` (ACDC over edges), ``sweep``
(exact edge sweep, then prune), ``attribution`` (EAP; EAP-IG for comparing metrics),
``attribute_verify``; ``--method`` picks the source: mean (per position with
``--per-position``), zero, or resample (each example's corrupted input).
"""

from __future__ import annotations

import json
import time
from typing import Any

from meanablate.cli.errors import Session, one_line
from meanablate.config import InputError, Resolved

__all__ = ["run_edges_command"]

_ALGORITHMS = {
    "acdc": "acdc",
    "sweep": "sweep",
    "attribution": "eap",
    "attribute_verify": "attribute_verify",
}


def _source(cfg: Resolved, per_position: bool) -> Any:
    from meanablate.discovery import Source

    if cfg["method"] == "resample":
        return Source("counterfactual")
    if cfg["method"] == "zero":
        return Source("zero")
    return Source("mean", per_position=per_position)


def run_edges_command(session: Session, cfg: Resolved) -> None:
    from meanablate.cli.runs import _load
    from meanablate.discovery import (
        EdgeData,
        discover_edges,
        edge_auroc,
        edge_ground_truth,
        edge_sweep,
        mib_curve,
        score_edge_circuit,
        to_mib_json,
    )

    t0 = time.perf_counter()
    inputs, out = _load(session, cfg)
    try:
        data = EdgeData(inputs.model, inputs.batches, _source(cfg, inputs.per_position))
    except TypeError as exc:
        raise InputError(one_line(exc)) from None
    algorithm = _ALGORITHMS[cfg["algorithm"]]
    metric = inputs.metric
    session.log(f"{inputs.name}: {len(data.graph)} edges, {data.n_examples} examples -> {out}")
    kwargs: dict[str, Any] = (
        {"threshold": cfg["threshold"]}
        if algorithm == "acdc"
        else {"target_faithfulness": cfg["target_faithfulness"]}
    )
    circuit = discover_edges(inputs.model, data, metric=metric, algorithm=algorithm, **kwargs)
    scores = circuit.unit_scores or edge_sweep(inputs.model, data, metric=metric)
    cs = score_edge_circuit(data, circuit.kept, metric)
    truth = None
    if inputs.source == "organism":
        from meanablate.organisms import registry

        try:
            truth = edge_ground_truth(registry.load(inputs.name))
        except ValueError:  # an organism without edge ground truth (e.g. minilm)
            truth = None
    try:
        curve = mib_curve(data, scores, metric)
        mib = {
            "percentages": list(curve.percentages),
            "faithfulness": curve.faithfulness,
            "edge_counts": curve.edge_counts,
            "cpr": curve.cpr,
            "cmd": curve.cmd,
        }
    except ValueError as exc:  # full and empty score alike: faithfulness undefined
        mib = {"error": one_line(exc)}
    result = {
        "model": inputs.name,
        "metric": metric,
        "source": cfg["method"],
        "algorithm": algorithm,
        "n_edges": len(data.graph),
        "circuit": sorted(circuit.kept, key=data.graph.names.index),
        "scores": scores.as_dict(),
        "score_method": scores.method,
        "faithfulness": cs.faithfulness,
        "completeness": cs.completeness,
        "metric_full": cs.metric_full,
        "metric_circuit": cs.metric_circuit,
        "metric_empty": cs.metric_empty,
        "ground_truth": truth,
        "edge_auroc": None if truth is None else edge_auroc(circuit.scores, truth),
        "mib": mib,
        "seconds": time.perf_counter() - t0,
    }
    (out / "edges.json").write_text(json.dumps(result, indent=1))
    _write_report(cfg, inputs, data, circuit, cs, truth, out, result["seconds"])
    (out / "circuit.dot").write_text(circuit.to_dot(title=f"{inputs.name}: {algorithm} edges"))
    to_mib_json(data.graph, scores, circuit.kept, out / "mib_circuit.json")
    auroc = "" if truth is None else f", edge AUROC {result['edge_auroc']:.3f}"
    print(
        f"{inputs.name}: {len(circuit.kept)} of {len(data.graph)} edges ({algorithm}), "
        f"faithfulness {cs.faithfulness:.3f}, completeness {cs.completeness:.3f}{auroc}; "
        f"wrote {out}/results.json, report.html, edges.json, circuit.dot, mib_circuit.json"
    )


def _write_report(
    cfg: Resolved,
    inputs: Any,
    data: Any,
    circuit: Any,
    cs: Any,
    truth: Any,
    out: Any,
    seconds: float,
) -> None:
    """``results.json`` and ``report.html``: the one run-folder writer ``discover`` uses."""
    from meanablate.results.api import model_facts, write_run
    from meanablate.results.edges import edge_results

    cls, n_layers = model_facts(inputs.model, [])
    saved = {k.replace("_", "-"): v for k, v in cfg.saved().items()}
    results = edge_results(
        circuit,
        data,
        circuit_scores=cs,
        ground_truth=truth,
        n_boot=int(cfg.values.get("n_boot") or 0) if "n_boot" in cfg.values else 1000,
        seed=int(cfg.values.get("seed") or 0),
        name=inputs.name,
        model_class=cls,
        n_layers=n_layers,
        config=saved,
        command="edges",
        timings={"total": seconds, "search": circuit.seconds},
        title=f"{inputs.name}: {circuit.algorithm} edge circuit",
        notes=getattr(inputs, "description", None) or None,
        extra_versions=getattr(inputs, "versions", None),
    )
    write_run(out, results)
