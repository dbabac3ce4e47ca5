"""``meanablate.report(...)``: a run folder from Python objects, as the CLI writes it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SCORE_FILES", "model_facts", "report", "write_run", "write_scores_run"]

# The file each scores command writes into the run folder.
SCORE_FILES = {"sweep": "sweep.json", "attribution": "attribution.json"}


def model_facts(model: Any, units: Sequence[str]) -> tuple[str, int]:
    """``(class path, n_layers)`` of a model: from its config, else from the units' layers."""
    from meanablate.discovery import unit_layer

    cls = f"{type(model).__module__}.{type(model).__qualname__}" if model is not None else "unknown"
    for cfg, names in (
        (getattr(model, "cfg", None), ("n_layers",)),
        (getattr(model, "config", None), ("n_layer", "num_hidden_layers", "n_layers")),
    ):
        for name in names:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return cls, value
    return cls, max([unit_layer(u) + 1 for u in units] + [0])


def write_means(means: Any, path: Path) -> None:
    """Save ``means`` as safetensors, atomically (a temp file, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        means.save(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_run(
    out: str | os.PathLike[str], results: dict[str, Any], means: Any = None, on_results: Any = None
) -> Path:
    """``means.safetensors``, ``results.json`` (atomic), then the plots and ``report.html``.

    ``on_results()`` is called once ``results.json`` is complete (before the report).
    """
    from meanablate.report import write_json_atomic, write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if means is not None:
        write_means(means, out / "means.safetensors")
    write_json_atomic(out / "results.json", results)
    if on_results is not None:
        on_results()
    return write_report(out)


def write_scores_run(
    out: str | os.PathLike[str],
    scores: Any,
    cis: Sequence[Any] | None,
    config: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    exact: Any = None,
) -> Path:
    """``sweep.json`` / ``attribution.json`` and its ``report.html``; returns the JSON's path.

    ``exact``: a sweep's scores to set beside an attribution's (its page then shows both
    and their rank correlation).
    """
    from meanablate.report import write_json_atomic, write_scores_report
    from meanablate.results.persist import scores_to_dict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "sweep" if scores.method == "sweep" else "attribution"
    obj = scores_to_dict(scores, list(cis) if cis is not None else None, config)
    if name:
        obj["name"] = name
    path = write_json_atomic(out / SCORE_FILES[kind], obj)
    if exact is not None and kind == "attribution":
        write_json_atomic(out / SCORE_FILES["sweep"], scores_to_dict(exact, None, config))
    write_scores_report(out)
    return path


def report(
    out: str | os.PathLike[str],
    circuit: Any = None,
    *,
    sweep: Any = None,
    attribution: Any = None,
    circuit_scores: Any = None,
    ground_truth: Sequence[str] | None = None,
    model: Any = None,
    name: str | None = None,
    means: Any = None,
    config: Mapping[str, Any] | None = None,
    seed: int = 0,
    n_boot: int = 1000,
    title: str | None = None,
    notes: str | None = None,
    timings: Mapping[str, float] | None = None,
    edge_data: Any = None,
) -> Path:
    """Write a run folder and its ``report.html`` from Python objects; returns the page's path.

    With a ``circuit`` (:class:`~meanablate.Circuit`): ``results.json`` (the CLI's schema),
    ``effects.png/svg/pdf``, ``faithfulness.*``, ``roc.*`` (with a ``ground_truth``) and
    ``report.html`` — what ``meanablate discover`` writes. ``sweep`` (exact effects) and
    ``attribution`` (estimates) fill the units table; ``circuit_scores``
    (:func:`~meanablate.score_circuit`) adds the faithfulness interval, completeness and
    minimality; ``means`` is saved as ``means.safetensors``. Without a circuit, a ``sweep``
    or an ``attribution`` alone gets its scores page (``sweep.json`` / ``attribution.json``).
    ``n_boot``: bootstrap resamples for each unit's interval (0: none). An edge circuit
    (:func:`~meanablate.discover_edges`) needs ``edge_data``, the
    :class:`~meanablate.discovery.EdgeData` it was found on: the page then draws its measured
    edges, and the units are the graph's nodes with their ablation effects
    (:func:`~meanablate.results.edges.edge_results`); ``ground_truth`` is then true edges.

    >>> import tempfile, torch, meanablate as ma
    >>> s = ma.Scores(["blocks.0.hook_mlp_out"], torch.tensor([0.5]),
    ...               torch.tensor([[0.4, 0.6]]), "kl", "sweep")
    >>> page = ma.report(tempfile.mkdtemp(), sweep=s, n_boot=0)
    >>> page.name
    'report.html'
    """
    from meanablate.results.build import discovery_results, unit_cis

    if circuit is None:
        if sweep is None and attribution is None:
            raise ValueError("report needs a circuit, a sweep or an attribution; got none")
        scores = attribution if attribution is not None else sweep
        cis = unit_cis(scores.per_example, n_boot, seed)
        write_scores_run(out, scores, cis, config, name=name, exact=sweep if attribution else None)
        return Path(out) / "report.html"
    from meanablate.results.edges import edge_results, is_edge_circuit

    if is_edge_circuit(circuit):
        if edge_data is None:
            raise ValueError(
                "report of an edge circuit needs edge_data=, the EdgeData it was found on "
                "(the node effects and circuit scores are measured on it)"
            )
        if sweep is not None or attribution is not None:
            raise ValueError("sweep= / attribution= are node scores; an edge report measures them")
        cls, n_layers = model_facts(edge_data.model, [])
        results = edge_results(
            circuit,
            edge_data,
            circuit_scores=circuit_scores,
            ground_truth=ground_truth,
            n_boot=n_boot,
            seed=seed,
            notes=notes,
            name=name or type(edge_data.model).__name__,
            model_class=cls,
            n_layers=n_layers,
            config=config,
            timings=timings,
            title=title,
        )
        return write_run(out, results, means)
    if edge_data is not None:
        raise ValueError("edge_data= is for an edge circuit; this circuit's units are sites")
    units = list(circuit.units)
    cls, n_layers = model_facts(model, units)
    cis = unit_cis(sweep.per_example, n_boot, seed) if sweep is not None else None
    results = discovery_results(
        circuit,
        sweep=sweep,
        attribution=attribution,
        circuit_scores=circuit_scores,
        cis=cis,
        ground_truth=ground_truth,
        name=name or (type(model).__name__ if model is not None else "model"),
        model_class=cls,
        n_layers=n_layers,
        config=config,
        seed=seed,
        timings=timings,
        title=title,
        notes=notes,
    )
    return write_run(out, results, means)
