"""Saving and loading results as JSON.

- :class:`~meanablate.Scores` <-> a ``sweep.json`` / ``attribution.json`` object (the CLI's
  files), with every unit's per-example effects so that a loaded ``Scores`` equals the saved
  one (float64 values survive JSON exactly: Python writes the shortest repr that reads back
  the same double).
- :class:`~meanablate.Circuit` <-> ``results.json`` (:mod:`meanablate.report.schema`): the
  schema's fields plus ``circuit.record``, the circuit's own fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "circuit_from_results",
    "load_circuit",
    "load_scores",
    "save_circuit",
    "save_scores",
    "scores_from_dict",
    "scores_to_dict",
]

SCORES_FORMAT = "meanablate.Scores"


def scores_to_dict(scores: Any, cis: list[Any] | None = None, config: Any = None) -> dict[str, Any]:
    """A JSON object of ``scores``: method, metric, and per unit its effect, interval,
    exactness and per-example effects."""
    per_example = scores.per_example.double()
    rows = []
    for i, (u, v, e) in enumerate(zip(scores.units, scores.values.tolist(), scores.exact.tolist())):
        rows.append(
            {
                "name": u,
                "effect": float(v),
                "ci": None if cis is None else cis[i],
                "exact": bool(e),
                "per_example": per_example[i].tolist(),
            }
        )
    return {
        "format": SCORES_FORMAT,
        "method": scores.method,
        "metric": scores.metric,
        "n_examples": int(per_example.shape[1]) if per_example.ndim == 2 else 0,
        "seconds": float(scores.seconds),
        "config": dict(config or {}),
        "units": rows,
    }


def scores_from_dict(obj: Any, *, where: str = "scores") -> Any:
    """The :class:`~meanablate.Scores` of a :func:`scores_to_dict` object."""
    from meanablate.discovery.scores import Scores
    from meanablate.report.schema import validate_scores

    validate_scores(obj, where=where)
    rows = obj["units"]
    values = torch.tensor([float(r["effect"]) for r in rows], dtype=torch.float64)
    if all("per_example" in r for r in rows):
        per_example = torch.tensor([r["per_example"] for r in rows], dtype=torch.float64)
        per_example = per_example.reshape(len(rows), -1)
    else:  # written by an older CLI: the means only
        per_example = values[:, None].clone()
    exact = torch.tensor([bool(r.get("exact", obj["method"] == "sweep")) for r in rows])
    return Scores(
        [r["name"] for r in rows],
        values,
        per_example,
        obj["metric"],
        obj["method"],
        exact=exact,
        seconds=float(obj.get("seconds", 0.0)),
    )


def _read_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def save_scores(
    scores: Any, path: str | os.PathLike[str], *, n_boot: int = 0, seed: int = 0
) -> Path:
    """Write ``scores`` as JSON (atomically); ``n_boot`` > 0 adds bootstrap intervals."""
    from meanablate.report import write_json_atomic
    from meanablate.results.build import unit_cis

    cis = unit_cis(scores.per_example, n_boot, seed) if n_boot else None
    return write_json_atomic(path, scores_to_dict(scores, cis))


def load_scores(path: str | os.PathLike[str]) -> Any:
    """Read a :class:`~meanablate.Scores` written by :func:`save_scores` (or the CLI)."""
    return scores_from_dict(_read_json(path), where=str(path))


def circuit_from_results(results: Any) -> Any:
    """The :class:`~meanablate.Circuit` of a validated ``results.json`` object."""
    from meanablate.discovery.prune import Circuit

    c = results["circuit"]
    record = dict(c.get("record") or {})
    fields = {f.name: f for f in dataclasses.fields(Circuit)}
    kwargs: dict[str, Any] = {}
    for k, v in record.items():
        f = fields.get(k)
        if f is None:
            continue
        if v is None and isinstance(f.default, float) and math.isnan(f.default):
            continue  # a NaN default (JSON has no NaN): keep the default
        if isinstance(v, list) and "tuple" in str(f.type).split("[", 1)[0]:
            v = tuple(v)
        kwargs[k] = v
    kwargs.update(
        units=[u["name"] for u in results["units"]],
        kept=list(c["units"]),
        metric=results["metric"]["name"],
    )
    for key in ("algorithm", "threshold", "metric_full", "metric_circuit", "metric_empty"):
        kwargs.setdefault(key, c.get(key))
    kwargs.setdefault("target_faithfulness", c.get("target_faithfulness"))
    if "scores" not in kwargs:  # a results.json from elsewhere: the units' effects
        kwargs["scores"] = {u["name"]: u["effect"] for u in results["units"]}
    kwargs["scores"] = {k: (math.nan if v is None else v) for k, v in kwargs["scores"].items()}
    kwargs["curve"] = [tuple(p) for p in kwargs.get("curve") or []]
    kwargs["seconds"] = float(results["timings"].get("search", 0.0))
    if results.get("unit_scores") is not None:
        kwargs["unit_scores"] = scores_from_dict(results["unit_scores"], where="unit_scores")
    return Circuit(**kwargs)


def save_circuit(circuit: Any, path: str | os.PathLike[str], **context: Any) -> Path:
    """Write ``circuit`` as a ``results.json`` (atomically; a folder gets ``results.json``).

    ``context``: the keywords of :func:`~meanablate.results.build.discovery_results`
    (``sweep=``, ``ground_truth=``, ``name=`` ...).
    """
    from meanablate.report import write_json_atomic
    from meanablate.results.build import discovery_results

    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    return write_json_atomic(path, discovery_results(circuit, **context))


def load_circuit(path: str | os.PathLike[str]) -> Any:
    """Read a :class:`~meanablate.Circuit` from a ``results.json`` (or its run folder)."""
    from meanablate.report import load_results

    return circuit_from_results(load_results(path))
