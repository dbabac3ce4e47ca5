"""The ``results.json`` object of a run, from Python objects: :func:`discovery_results`.

The CLI's pipeline and :func:`meanablate.report` both call it, so a run folder written from
a notebook is the same as the CLI's. ``units[].effect`` is the exact sweep when there is one;
otherwise the best evidence there is, named in ``effect_source`` (``"sweep"``,
``"attribution"``: an estimate, or the pruning algorithm's own score).
"""

from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from torch import Tensor

__all__ = ["circuit_record", "discovery_results", "unit_cis", "unit_row", "versions"]


def versions(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """python, torch, numpy (and ``extra``) versions, as strings."""
    from importlib import metadata

    def v(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {
        "python": platform.python_version(),
        "torch": v("torch"),
        "numpy": v("numpy"),
        **(extra or {}),
    }


def unit_cis(per_example: Tensor, n_boot: int, seed: int, progress: bool = False) -> list[Any]:
    """Bootstrap intervals ``[lo, hi]`` of each row's mean (``None`` each without enough data)."""
    from meanablate.intervene import bootstrap_ci

    if n_boot < 1 or per_example.ndim != 2 or per_example.shape[1] < 2:
        return [None] * per_example.shape[0]
    rows: Any = per_example
    if progress and per_example.shape[0] > 50:
        from tqdm.auto import tqdm

        rows = tqdm(per_example, desc="bootstrap", unit="unit")
    return [list(bootstrap_ci(row, n_boot=n_boot, seed=seed)) for row in rows]


def _unit_index(site: Any) -> int | None:
    for chosen in (site.heads, site.neurons, site.positions):
        if chosen is not None:
            return int(chosen[0]) if len(chosen) == 1 else None
    return None


def unit_row(name: str) -> dict[str, Any]:
    """``name``, ``layer``, ``kind``, ``index`` of a unit (the schema's unit fields)."""
    from meanablate.discovery import unit_kind, unit_layer
    from meanablate.sites import parse_site

    return {
        "name": name,
        "layer": unit_layer(name),
        "kind": unit_kind(name),
        "index": _unit_index(parse_site(name)),
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _json_safe(tolist())
    return str(value)


def circuit_record(circuit: Any) -> dict[str, Any]:
    """The fields of a ``Circuit`` that ``results.json`` holds nowhere else, JSON-safe (its
    run time is ``timings.search``, its ``unit_scores`` the top-level ``unit_scores``: both
    change from run to run, the record does not)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(circuit):
        if f.name in ("units", "kept", "metric", "seconds", "unit_scores"):
            continue  # results.units, circuit.units, metric.name, timings.search, unit_scores
        value = getattr(circuit, f.name)
        if f.name == "curve":
            out[f.name] = [list(p) for p in value]
        else:
            out[f.name] = _json_safe(value)
    return out


def discovery_results(
    circuit: Any,
    *,
    sweep: Any = None,
    attribution: Any = None,
    circuit_scores: Any = None,
    cis: Sequence[Any] | None = None,
    minimality: Mapping[str, float] | None = None,
    ground_truth: Sequence[str] | None = None,
    curve: Mapping[str, list] | None = None,
    name: str = "model",
    model_class: str = "unknown",
    n_layers: int | None = None,
    config: Mapping[str, Any] | None = None,
    seed: int = 0,
    command: str = "api",
    timings: Mapping[str, float] | None = None,
    title: str | None = None,
    notes: str | None = None,
    extra_versions: Mapping[str, str] | None = None,
    higher_is_better: bool | None = None,
    edges: Sequence[Mapping[str, Any]] | None = None,
    edges_left_out: int | None = None,
) -> dict[str, Any]:
    """A validated ``results.json`` object (see :mod:`meanablate.report.schema`).

    ``circuit``: a :class:`~meanablate.Circuit`; ``sweep`` / ``attribution``: the
    :class:`~meanablate.Scores` of every unit (exact effects / estimates); ``cis``: one
    interval per unit of the sweep; ``circuit_scores``: :func:`~meanablate.score_circuit`'s
    result (faithfulness interval, completeness, minimality). ``edges`` / ``edges_left_out``:
    the measured edges drawn on the graph (see :func:`meanablate.results.edges.edge_results`,
    which fills them from an edge circuit).
    """
    import meanablate as ma
    from meanablate.metrics import get_metric
    from meanablate.report import validate_results

    units = list(circuit.units)
    if sweep is not None:
        effects, effect_source = sweep.as_dict(), "sweep"
    elif circuit.unit_scores is not None:
        effects = circuit.unit_scores.as_dict()
        effect_source = "sweep" if bool(circuit.unit_scores.exact.all()) else "attribution"
    elif attribution is not None:
        effects, effect_source = attribution.as_dict(), "attribution"
    else:
        effects, effect_source = dict(circuit.scores), circuit.algorithm
    if sweep is not None and cis is None:
        cis = unit_cis(sweep.per_example, 1000, seed)
    ci_of = dict(zip(sweep.units, cis)) if sweep is not None and cis is not None else {}
    attr = attribution.as_dict() if attribution is not None else None
    kept = set(circuit.kept)
    truth = set(ground_truth) if ground_truth else None
    rows = []
    for u in units:
        row = unit_row(u)
        effect = effects.get(u, math.nan)
        row.update(
            effect=float(effect) if effect is not None else math.nan,
            ci=ci_of.get(u),
            attribution=None if attr is None else float(attr[u]),
            in_circuit=u in kept,
            in_ground_truth=None if truth is None else u in truth,
        )
        rows.append(row)
    auroc, roc = None, None
    if truth:
        try:
            fpr, tpr, auroc = circuit.roc(sorted(truth))
            roc = {"fpr": fpr, "tpr": tpr}
        except ValueError:
            auroc = None
    if curve is None and circuit.curve:
        curve = {
            "size": [s for s, _ in circuit.curve],
            "faithfulness": [f for _, f in circuit.curve],
        }
    try:
        m = get_metric(circuit.metric)
        metric_name, hib = m.name, m.higher_is_better
    except (KeyError, ValueError):
        metric_name, hib = circuit.metric, bool(higher_is_better)
    if higher_is_better is not None:
        hib = higher_is_better
    cs = circuit_scores
    faith = cs.faithfulness if cs is not None else circuit.faithfulness
    ci = cs.faithfulness_ci if cs is not None else None
    if ci is not None and not all(map(math.isfinite, ci)):
        ci = None
    completeness = cs.completeness if cs is not None else None
    if minimality is None and cs is not None and cs.minimality:
        minimality = dict(cs.minimality)
    n_layers = n_layers if n_layers is not None else max([r["layer"] + 1 for r in rows] + [0])
    record = circuit_record(circuit)
    circuit_obj = {
        "algorithm": circuit.algorithm,
        "threshold": circuit.threshold,
        "target_faithfulness": circuit.target_faithfulness,
        "units": [u for u in units if u in kept],
        "metric_full": cs.metric_full if cs is not None else circuit.metric_full,
        "metric_circuit": cs.metric_circuit if cs is not None else circuit.metric_circuit,
        "metric_empty": cs.metric_empty if cs is not None else circuit.metric_empty,
        "record": record,  # the Circuit's own fields: Circuit.load rebuilds it from these
    }
    for key in (
        "certificate",
        "certificate_text",
        "mean_kind",
        "keep_positions",
        "abs_threshold",
        "behaviour",
        "behaviour_ci",
    ):
        value = getattr(circuit, key, None)
        if value is not None:
            circuit_obj[key] = _json_safe(value)
    notes_of = getattr(circuit, "notes", None)
    if isinstance(notes_of, list) and notes_of:
        circuit_obj["notes"] = list(notes_of)
    timings = dict(timings or {})
    timings.setdefault("search", circuit.seconds)
    from meanablate.discovery.evaluate import score_notes
    from meanablate.results.persist import scores_to_dict

    results = {
        "schema_version": 1,
        "meanablate_version": ma.__version__,
        "versions": versions(extra_versions),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "config": dict(config or {}),
        "command": command,
        "model": {"name": name, "class": model_class, "n_layers": int(n_layers)},
        "metric": {"name": metric_name, "higher_is_better": bool(hib)},
        "effect_source": effect_source,
        "units": rows,
        "circuit": circuit_obj,
        "scores": {
            "faithfulness": faith,
            "faithfulness_ci": list(ci) if ci else None,
            "completeness": completeness
            if completeness is None or math.isfinite(completeness)
            else None,
            "notes": score_notes(
                faith,
                completeness if completeness is None or math.isfinite(completeness) else None,
                minimality,
            ),
            "minimality": dict(minimality) if minimality else None,
            "auroc": auroc,
            "roc": roc,
        },
        "curve": dict(curve) if curve else None,
        "edges": [dict(e) for e in edges] if edges is not None else None,
        "edges_left_out": edges_left_out,
        "timings": {k: max(0.0, float(v)) for k, v in timings.items()},
        "unit_scores": None if circuit.unit_scores is None else scores_to_dict(circuit.unit_scores),
        "title": title,
        "notes": notes,
    }
    validate_results(results)
    return results
