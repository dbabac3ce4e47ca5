"""The pipeline behind ``meanablate discover`` / ``demo``, and the run folder.

:func:`run_discovery` computes (or reads) the means, sweeps every unit, estimates effects by
attribution, discovers the circuit, scores it, and returns a ``results.json`` object that
validates against :mod:`meanablate.report.schema`. :func:`write_run` writes the run folder:
``means.safetensors``, ``results.json`` (atomically: an interrupted run never leaves half a
file), then the plots and ``report.html``.
"""

from __future__ import annotations

import math
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from torch import Tensor

from meanablate.cli.errors import one_line
from meanablate.cli.records import Inputs, Log, quiet_log
from meanablate.config import InputError, Resolved, dump_toml

__all__ = [
    "compute_or_load_means",
    "default_run_dir",
    "prepare_run_dir",
    "run_discovery",
    "unit_cis",
    "write_means",
    "write_run",
]


def compute_or_load_means(
    cfg: Resolved, inputs: Inputs, *, progress: bool, log: Log = quiet_log, executor: Any = None
) -> Any:
    """The means of every unit's site: read from ``--means`` or computed on the batches
    (on ``executor``'s workers when given: see :mod:`meanablate.cli.executor`)."""
    from meanablate.errors import MeansFileError
    from meanablate.sites import as_sites
    from meanablate.stats import Means, compute_means

    keys = sorted({s.key for s in as_sites(inputs.units)})
    if cfg["means"]:
        path = Path(cfg["means"])
        if not path.is_file():
            raise InputError(f"--means {path}: no such file")
        try:
            means = Means.load(path, inputs.model)
        except MeansFileError as exc:  # its message names the file: say it once
            raise InputError(f"--means {path}: {one_line(exc.problem)}") from None
        except Exception as exc:
            raise InputError(f"--means {path}: {one_line(exc)}") from None
        missing = [k for k in keys if k not in means]
        if missing:
            raise InputError(f"--means {path}: no means for site(s) {', '.join(missing[:5])}")
        log(f"means: read {len(means.keys())} sites from {path}")
        return means
    if cfg["method"] in ("zero", "resample"):
        return None
    kind = inputs.effective_mean_kind
    log(f"means: {len(keys)} sites over {inputs.n_examples} examples ({kind} means)")
    keep = inputs.keep_positions if kind == "plain_except" else None
    if keep is not None:
        log(f"means: positions {keep} keep their own per-position means")
    return compute_means(
        inputs.model,
        keys,
        inputs.batches,
        kind=kind,
        keep_positions=keep,
        progress=progress,
        executor=executor,
    )


def unit_cis(per_example: Tensor, n_boot: int, seed: int, progress: bool) -> list[Any]:
    from meanablate.results.build import unit_cis as cis

    return cis(per_example, n_boot, seed, progress)


def _curve(
    inputs: Inputs,
    means: Any,
    ranking: list[str],
    cfg: Resolved,
    m_full: float,
    m_empty: float,
    progress: bool,
) -> dict[str, list] | None:
    """Faithfulness of the top-k units by |effect|, for up to 17 sizes k (0 and all included)."""
    from meanablate.discovery import faithfulness
    from meanablate.discovery.subsets import SetMetric

    set_metric = SetMetric(
        inputs.model, inputs.batches, inputs.units, means, inputs.metric, method=cfg["method"]
    )
    n = len(ranking)
    steps = min(n, 16)
    sizes = sorted({round(i * n / steps) for i in range(steps + 1)})
    it: Any = sizes
    if progress and n > 8:
        from tqdm.auto import tqdm

        it = tqdm(sizes, desc="curve", unit="size")
    faith = []
    for k in it:
        keep = set(ranking[:k])
        ablated = [u for u in inputs.units if u not in keep]
        m = float(set_metric(ablated).mean())
        # nothing kept is the empty circuit: 0 by definition (not -0.0 or 1e-16)
        faith.append(faithfulness(m, m_full, m_empty) + 0.0 if k else 0.0)
    return {"size": sizes, "faithfulness": faith}


def _minimality(
    inputs: Inputs, means: Any, kept: list[str], cs: Any, method: str, progress: bool
) -> dict[str, float]:
    """Per kept unit ``v``: ``(m(circuit) - m(circuit minus v)) / (m(full) - m(empty))``.

    As :func:`~meanablate.discovery.score_circuit` computes it, with a progress bar (one
    evaluation per kept unit).
    """
    from meanablate.discovery.subsets import SetMetric

    set_metric = SetMetric(
        inputs.model, inputs.batches, inputs.units, means, inputs.metric, method=method
    )
    in_circuit = set(kept)
    rest = [u for u in inputs.units if u not in in_circuit]
    denom = cs.metric_full - cs.metric_empty
    it: Any = kept
    if progress and len(kept) > 8:
        from tqdm.auto import tqdm

        it = tqdm(kept, desc="minimality", unit="unit")
    out = {}
    for v in it:
        m_minus = set_metric([*rest, v])
        out[v] = (cs.metric_circuit - float(m_minus.mean())) / denom
    return out


def discover_options(cfg: Resolved) -> dict[str, Any]:
    """The keyword arguments of ``discover`` that the run's options set: one place for the
    run and its estimate, so both search the same way (and refuse the same inputs)."""
    acdc = cfg["algorithm"] == "acdc"
    abs_threshold = cfg["abs_threshold"] if acdc else None
    return {
        "threshold": cfg["threshold"] if acdc and abs_threshold is None else None,
        "abs_threshold": abs_threshold,
        "target_faithfulness": None if acdc else cfg["target_faithfulness"],
        "force": bool(cfg["force_discovery"] or cfg["force"]),
        "max_exhaustive": cfg["max_exhaustive"] if cfg["max_exhaustive"] is not None else 4096,
    }


def run_discovery(
    cfg: Resolved,
    inputs: Inputs,
    *,
    progress: bool,
    log: Log = quiet_log,
    command: str = "discover",
    timings: dict[str, float] | None = None,
    executor: Any = None,
    on_means: Any = None,
) -> tuple[dict[str, Any], Any]:
    """Means, sweep, attribution, discovery and scores: ``(results, means)``.

    ``executor`` (a :class:`~meanablate.executors.RayExecutor`, say) runs the means, the
    sweep and the attribution; the discovery and the scores run here. ``on_means(means)``
    is called once the means are known; it may return a sweep
    :class:`~meanablate.Estimate` whose ``run()`` then does the sweep.
    """
    import meanablate as ma
    from meanablate.discovery import score_circuit

    timings = dict(timings or {})
    model, batches, units, metric = inputs.model, inputs.batches, inputs.units, inputs.metric
    method, seed, n_boot = cfg["method"], cfg["seed"], cfg["n_boot"]

    t = time.perf_counter()
    means = compute_or_load_means(cfg, inputs, progress=progress, log=log, executor=executor)
    timings["means"] = time.perf_counter() - t

    planned = on_means(means) if on_means is not None else None
    log(f"sweep: {len(units)} units, metric {metric}")
    if planned is not None:  # reuses the units its calibration swept
        sweep = planned.run(progress=progress)
    else:
        sweep = ma.sweep(
            model, batches, units, means,
            metric=metric, method=method, progress=progress, executor=executor,
        )  # fmt: skip
    timings["sweep"] = sweep.seconds
    t = time.perf_counter()
    cis = unit_cis(sweep.per_example, n_boot, seed, progress)
    timings["bootstrap"] = time.perf_counter() - t

    attr_scores = None
    if cfg["attribution"]:
        t = time.perf_counter()
        grad_metric = "loss" if metric == "accuracy" else metric
        try:
            attr = ma.attribute(
                model, batches, units, means,
                metric=grad_metric, method=method, executor=executor,
            )  # fmt: skip
            attr_scores = attr
        except Exception as exc:  # a model without gradients, say: the report does without
            log(f"attribution skipped: {type(exc).__name__}: {one_line(exc)}")
        timings["attribution"] = time.perf_counter() - t

    algorithm = cfg["algorithm"]
    options = discover_options(cfg)
    threshold, abs_threshold = options["threshold"], options["abs_threshold"]
    log(
        f"discover: {algorithm}"
        + (f", threshold {threshold:g} of |m(full) - m(empty)|" if threshold is not None else "")
        + (f", absolute threshold {abs_threshold:g}" if abs_threshold is not None else "")
        + (f", target faithfulness {cfg['target_faithfulness']:g}" if algorithm != "acdc" else "")
    )
    circuit = ma.discover(
        model,
        batches,
        means,
        units=units,
        metric=metric,
        algorithm=algorithm,
        method=method,
        progress=progress,
        **options,
    )
    timings["search"] = circuit.seconds

    log(f"score: circuit of {len(circuit.kept)} units")
    t = time.perf_counter()
    cs = score_circuit(
        model, batches, circuit.kept, units, means, metric,
        method=method, n_boot=max(n_boot, 1), seed=seed, with_minimality=False,
    )  # fmt: skip
    minimality = _minimality(inputs, means, circuit.kept, cs, method, progress)
    timings["score"] = time.perf_counter() - t

    gt = inputs.ground_truth
    if gt:
        try:
            circuit.roc(gt)
        except ValueError as exc:
            log(f"AUROC skipped: {one_line(exc)}")

    if circuit.curve:
        curve = {
            "size": [s for s, _ in circuit.curve],
            "faithfulness": [f for _, f in circuit.curve],
        }
    elif len(units) <= 512:
        t = time.perf_counter()
        curve = _curve(
            inputs, means, sweep.ranking(), cfg, cs.metric_full, cs.metric_empty, progress
        )
        timings["curve"] = time.perf_counter() - t
    else:
        curve = None

    from meanablate.results.api import model_facts
    from meanablate.results.build import discovery_results

    model_class, n_layers = model_facts(model, units)
    saved = {k.replace("_", "-"): v for k, v in cfg.saved().items()}
    results = discovery_results(
        circuit,
        sweep=sweep,
        attribution=attr_scores,
        circuit_scores=cs if n_boot >= 1 else _no_ci(cs),
        cis=cis,
        minimality=minimality,
        ground_truth=gt or None,
        curve=curve,
        name=inputs.name,
        model_class=model_class,
        n_layers=n_layers,
        config=saved,
        seed=seed,
        command=command,
        timings=timings,
        title=f"{inputs.name}: {algorithm} circuit",
        notes=inputs.description or None,
        extra_versions=inputs.versions,
    )
    if algorithm == "acdc":
        results["circuit"]["target_faithfulness"] = None
    else:
        results["circuit"]["threshold"] = None
    return results, means


# -- the run folder --------------------------------------------------------------------------
def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>`` (with ``-2``, ``-3``... if taken)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{safe}-{stamp}"
    n = 2
    while path.exists():
        path = Path(root) / f"{safe}-{stamp}-{n}"
        n += 1
    return path


# What a run leaves in its folder: an --out folder holding one of these holds a run. (A
# folder with only config.toml holds a run that failed before writing anything: reusable.)
RUN_FILES = ("results.json", "means.safetensors", "sweep.json", "attribution.json", "report.html")


def check_out_free(out: Path, force: bool) -> None:
    """``InputError`` if ``out`` already holds a run and ``force`` is not set."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    taken = [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []
    if taken and not force:
        raise InputError(
            f"--out {out}: already holds a run ({', '.join(taken[:3])}); choose another "
            "folder, or pass --force to replace its files"
        )


def prepare_run_dir(out: Path, cfg: Resolved, command: str) -> None:
    """Create the run folder and write ``config.toml`` (the options, to rerun with --config)."""
    from meanablate.report import write_bytes_atomic

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    header = (
        f"meanablate {command}: rerun with `meanablate {command} --config {out / 'config.toml'}`"
    )
    text = dump_toml(cfg.saved(), header=header)
    write_bytes_atomic(out / "config.toml", text.encode("utf-8"))


def write_means(means: Any, path: Path) -> None:
    """Save ``means`` as safetensors, atomically (a temp file, then a rename)."""
    from meanablate.results.api import write_means as write

    write(means, path)


def write_run(out: Path, results: dict[str, Any], means: Any, on_results: Any = None) -> Path:
    """``means.safetensors``, ``results.json`` (atomic), then the plots and ``report.html``
    (:func:`meanablate.results.write_run`, which :func:`meanablate.report` calls too)."""
    from meanablate.results.api import write_run as write

    return write(out, results, means, on_results)


def _no_ci(cs: Any) -> Any:
    """``cs`` without its faithfulness interval (``--n-boot 0``)."""
    import dataclasses

    return dataclasses.replace(cs, faithfulness_ci=(math.nan, math.nan))
