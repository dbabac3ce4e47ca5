"""Reports of discovery runs: ``results.json`` -> plots and a self-contained ``report.html``.

A discovery run writes its results with :func:`write_json_atomic` (so an interrupted run never
leaves a half-written file) in the format documented in :mod:`meanablate.report.schema`;
:func:`write_report` turns the run folder into something to look at::

    from meanablate.report import example_results, write_json_atomic, write_report

    write_json_atomic(run_dir / "results.json", example_results())
    write_report(run_dir)   # -> run_dir/report.html (+ effects.png, faithfulness.png, roc.png)

The HTML page is a single file with no external resources: inline CSS and JS, the plots as
base64 PNGs (each also written as SVG and PDF beside it), and the circuit as an inline SVG
(hover a unit for its effect). ``sweep`` and ``attribute`` runs get a page too
(:func:`write_scores_report`).

The module is also callable: ``meanablate.report(out, circuit, sweep=...)`` is
:func:`meanablate.results.report`, a run folder written from Python objects.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import types
from importlib import metadata
from pathlib import Path
from typing import Any

from meanablate.report._io import write_bytes_atomic, write_json_atomic
from meanablate.report.schema import RESULTS_SCHEMA, SCHEMA_VERSION, validate_results

__all__ = [
    "PLOT_FILES",
    "RESULTS_SCHEMA",
    "SCHEMA_VERSION",
    "example_results",
    "load_results",
    "validate_results",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_report",
    "write_scores_report",
]

RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"
PLOT_FILES = {"effects": "effects.png", "faithfulness": "faithfulness.png", "roc": "roc.png"}


# -- reading and reporting -------------------------------------------------------------------
def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a ``results.json`` (a file, or a run folder containing one)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    with open(path, encoding="utf-8") as file:
        try:
            results = json.load(file)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    try:
        validate_results(results)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return results


def _draw(plots: Any, run_dir: Path) -> tuple[dict[str, bytes], dict[str, list[str]]]:
    """Run each ``(key, draw, results)``; the PNG bytes and SVG / PDF names of those drawn."""
    from meanablate.report.plots import FORMATS

    images: dict[str, bytes] = {}
    links: dict[str, list[str]] = {}
    for key, draw, results in plots:
        target = run_dir / PLOT_FILES[key]
        if draw(results, target) is None:
            for fmt in FORMATS:  # e.g. no ground truth: no roc.* (drop stale ones)
                target.with_suffix(f".{fmt}").unlink(missing_ok=True)
            continue
        images[key] = target.read_bytes()
        links[key] = [target.with_suffix(f".{fmt}").name for fmt in FORMATS if fmt != "png"]
    return images, links


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Read ``run_dir/results.json``, validate it, and write the report into ``run_dir``.

    Writes ``effects``, ``faithfulness`` and ``roc`` plots (only when a ground truth is known,
    i.e. ``scores.auroc`` is not null; stale ones are removed otherwise), each as PNG, SVG
    and PDF, and the self-contained ``report.html``. Returns the path of ``report.html``.
    Raises :class:`ValueError` naming the path of the first problem if the results are
    invalid.
    """
    from meanablate.report import html, plots

    run_dir = Path(run_dir)
    results = load_results(run_dir / RESULTS_FILE)
    images, links = _draw(
        [
            ("effects", plots.plot_effects, results),
            ("faithfulness", plots.plot_faithfulness, results),
            ("roc", plots.plot_roc, results),
        ],
        run_dir,
    )
    page = html.render_html(results, images, links)
    return write_bytes_atomic(run_dir / REPORT_FILE, page.encode("utf-8"))


def write_scores_report(run_dir: str | os.PathLike[str]) -> Path:
    """The page of a ``sweep`` / ``attribute`` run: ``run_dir/report.html`` from its
    ``attribution.json`` (beside ``sweep.json`` when both exist) or ``sweep.json``.

    Draws the importance heat map (``effects.png/svg/pdf``) and a table of every unit;
    attribution is labelled an estimate, set beside the exact effect with their rank
    correlation when the sweep is there too.
    """
    from meanablate import __version__
    from meanablate.report import html, plots
    from meanablate.report.schema import validate_scores
    from meanablate.report.scores_page import heatmap_results

    run_dir = Path(run_dir)
    found = {}
    for name in ("attribution.json", "sweep.json"):
        if (run_dir / name).is_file():
            with open(run_dir / name, encoding="utf-8") as file:
                try:
                    found[name] = json.load(file)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{run_dir / name} is not valid JSON: {exc}") from None
            validate_scores(found[name], where=str(run_dir / name))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no sweep.json or attribution.json")
    main = found.get("attribution.json") or found["sweep.json"]
    exact = found.get("sweep.json") if "attribution.json" in found else None
    images, links = _draw([("effects", plots.plot_effects, heatmap_results(main))], run_dir)
    page = html.render_scores_html(main, images, links, exact=exact, version=__version__)
    return write_bytes_atomic(run_dir / REPORT_FILE, page.encode("utf-8"))


# -- a realistic synthetic example -----------------------------------------------------------
def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def example_results(*, seed: int = 0, with_edges: bool = False) -> dict[str, Any]:
    """A realistic, deterministic synthetic ``results.json`` object, for tests and docs.

    A 3-layer toy transformer with 4 heads and an MLP per layer (15 units) on an induction
    task; the ground truth is a previous-token head (L0H1), two induction heads (L1H2, L1H3)
    and the last MLP. A threshold on ``|effect|`` keeps five units: it catches a negative
    head (L2H0) and the first MLP, misses the last MLP. ``with_edges`` adds an explicit
    ``edges`` list (otherwise ``edges`` is null and the report draws its default graph).
    """
    from meanablate import __version__
    from meanablate.report.plots import roc_curve

    rng = random.Random(seed)
    n_layers, n_heads = 3, 4
    planted = {
        (0, "head", 1): 1.42,
        (1, "head", 2): 2.05,
        (1, "head", 3): 0.61,
        (2, "head", 0): -0.34,
        (0, "mlp", None): 0.29,
        (2, "mlp", None): 0.21,
    }
    truth = {(0, "head", 1), (1, "head", 2), (1, "head", 3), (2, "mlp", None)}
    threshold = 0.25
    units: list[dict[str, Any]] = []
    for layer in range(n_layers):
        keys: list[tuple[int, str, int | None]] = [(layer, "head", h) for h in range(n_heads)]
        keys.append((layer, "mlp", None))
        for key in keys:
            _, kind, index = key
            effect = planted.get(key, rng.gauss(0.0, 0.05))
            half = 0.04 + 0.08 * abs(effect) + abs(rng.gauss(0.0, 0.015))
            skew = rng.uniform(-0.3, 0.3) * half
            name = (
                f"blocks.{layer}.attn.hook_z[heads={index}]"
                if kind == "head"
                else f"blocks.{layer}.hook_mlp_out"
            )
            units.append(
                {
                    "name": name,
                    "layer": layer,
                    "kind": kind,
                    "index": index,
                    "effect": round(effect, 4),
                    "ci": [round(effect - half + skew, 4), round(effect + half + skew, 4)],
                    "attribution": round(effect * rng.gauss(1.0, 0.15) + rng.gauss(0, 0.03), 4),
                    "in_circuit": abs(effect) >= threshold,
                    "in_ground_truth": key in truth,
                }
            )
    kept = [u["name"] for u in units if u["in_circuit"]]

    # faithfulness against size: add units in order of |effect|, metric roughly additive
    order = sorted(units, key=lambda u: -abs(u["effect"]))
    total = sum(u["effect"] for u in units)
    sizes, faith, running = [0], [0.0], 0.0
    for size, unit in enumerate(order, start=1):
        running += unit["effect"]
        sizes.append(size)
        faith.append(round(running / total, 4))
    metric_full, metric_empty = 3.12, 0.08
    f_circuit = faith[len(kept)]
    metric_circuit = round(metric_empty + f_circuit * (metric_full - metric_empty), 4)

    fpr, tpr, auroc = roc_curve(
        [abs(u["effect"]) for u in units], [bool(u["in_ground_truth"]) for u in units]
    )
    by_key = {(u["layer"], u["kind"], u["index"]): u["name"] for u in units}
    minimality = {u["name"]: round(u["effect"] / total, 4) for u in units if u["in_circuit"]}
    edges = None
    if with_edges:
        edges = [
            {"source": "input", "target": by_key[(0, "head", 1)], "weight": 1.42},
            {"source": "input", "target": by_key[(0, "mlp", None)], "weight": 0.29},
            {"source": by_key[(0, "head", 1)], "target": by_key[(1, "head", 2)], "weight": 1.1},
            {"source": by_key[(0, "head", 1)], "target": by_key[(1, "head", 3)], "weight": 0.45},
            {"source": by_key[(0, "mlp", None)], "target": by_key[(1, "head", 2)], "weight": 0.2},
            {"source": by_key[(1, "head", 2)], "target": by_key[(2, "head", 0)], "weight": 0.3},
            {"source": by_key[(1, "head", 2)], "target": "output", "weight": 2.05},
            {"source": by_key[(1, "head", 3)], "target": "output", "weight": 0.61},
            {"source": by_key[(2, "head", 0)], "target": "output", "weight": -0.34},
        ]
    return {
        "schema_version": SCHEMA_VERSION,
        "meanablate_version": __version__,
        "versions": {
            "python": platform.python_version(),
            "torch": _version("torch"),
            "numpy": _version("numpy"),
        },
        "created": "2025-01-15T12:00:00+00:00",
        "seed": seed,
        "config": {
            "organism": "toy-3l-induction",
            "data": {"n_prompts": 256, "seq_len": 24, "batch_size": 64},
            "means": {"n_batches": 8},
            "metric": "logit_diff",
            "discovery": {"algorithm": "threshold", "score": "abs_effect", "threshold": threshold},
            "bootstrap": {"n_resamples": 1000, "level": 0.95},
        },
        "model": {
            "name": "toy-3l-induction",
            "class": "meanablate.organisms.transformer.HookedTransformer",
            "n_layers": n_layers,
        },
        "metric": {"name": "logit_diff", "higher_is_better": True},
        "units": units,
        "circuit": {
            "algorithm": "threshold",
            "threshold": threshold,
            "units": kept,
            "metric_full": metric_full,
            "metric_circuit": metric_circuit,
            "metric_empty": metric_empty,
        },
        "scores": {
            "faithfulness": f_circuit,
            "faithfulness_ci": [round(f_circuit - 0.041, 4), round(f_circuit + 0.035, 4)],
            "completeness": 0.87,
            "minimality": minimality,
            "auroc": round(auroc, 4),
            "roc": {"fpr": [round(x, 4) for x in fpr], "tpr": [round(x, 4) for x in tpr]},
        },
        "curve": {"size": sizes, "faithfulness": faith},
        "edges": edges,
        "timings": {"means": 1.84, "effects": 6.21, "bootstrap": 3.95, "search": 0.42},
    }


class _CallableModule(types.ModuleType):
    """``meanablate.report(...)`` writes a run folder (:func:`meanablate.results.report`);
    ``meanablate.report.write_report`` and the rest stay reachable as module attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        from meanablate.results.api import report

        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
