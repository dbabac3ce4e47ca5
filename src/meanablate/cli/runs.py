"""What the run commands do once their options are resolved: load the inputs, run (here or on
Ray, ``--ray``), write the run folder and print the results.

:func:`run_discover` serves ``demo`` and ``discover``; :func:`run_scores` serves ``means``,
``sweep`` and ``attribute``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from meanablate.cli.errors import Session
from meanablate.cli.records import Inputs
from meanablate.config import InputError, Resolved

__all__ = ["SCORE_FILES", "run_discover", "run_scores"]

# The file each scores command writes into the run folder (``means``: means.safetensors).
SCORE_FILES = {"sweep": "sweep.json", "attribute": "attribution.json"}


def _out_dir(cfg: Resolved, name: str) -> Path:
    from meanablate.cli.pipeline import default_run_dir

    return Path(cfg["out"]) if cfg["out"] else default_run_dir(name)


def _positions(inputs: Inputs) -> str | None:
    """The positions keeping their own mean (plain_except: default 0), as the option."""
    if inputs.effective_mean_kind != "plain_except":
        return None
    return ",".join(str(p) for p in (inputs.keep_positions or [0]))


def _record_effective(cfg: Resolved, inputs: Inputs) -> None:
    """Write the values a run actually used (metric, example count) into its options."""
    for key, value in (
        ("metric", inputs.metric),
        ("per_position", inputs.per_position),
        ("mean_kind", inputs.effective_mean_kind),
        ("keep_positions", _positions(inputs)),
    ):
        if cfg.sources[key] != "not used":  # an option of this command
            cfg.values[key] = value
    if inputs.source != "huggingface" or cfg["n_examples"] is not None:
        cfg.values["n_examples"] = inputs.n_examples  # a prompts file: all its lines


def _load(session: Session, cfg: Resolved) -> tuple[Inputs, Path]:
    """The inputs and the run folder (created, with its config.toml; not for --dry-run)."""
    from meanablate.cli.inputs import load_inputs
    from meanablate.cli.pipeline import check_out_free, prepare_run_dir

    if cfg["out"]:  # before the (slow) model load
        check_out_free(Path(cfg["out"]), bool(cfg["force"]))
    inputs = load_inputs(cfg, session.log)
    out = _out_dir(cfg, inputs.name)
    _record_effective(cfg, inputs)
    if cfg.sources["algorithm"] != "not used":  # demo, discover
        acdc = cfg["algorithm"] == "acdc"
        unused = ["target_faithfulness"] if acdc else ["threshold", "abs_threshold"]
        if acdc and cfg["abs_threshold"] is not None:
            unused.append("threshold")  # --abs-threshold replaces it
        for key in unused:
            if cfg.sources[key] != "default":
                session.log(
                    f"note: {key.replace('_', '-')} is ignored by --algorithm {cfg['algorithm']}"
                    + (" with --abs-threshold" if key == "threshold" and acdc else "")
                )
            cfg.values[key] = None
    if not cfg["dry_run"]:
        prepare_run_dir(out, cfg, session.command)
    return inputs, out


def _executor(cfg: Resolved, session: Session) -> Any:
    """Ray's executor for a run; none for a dry run (its estimate is of this process)."""
    import contextlib

    from meanablate.cli.executor import ray_executor

    return contextlib.nullcontext() if cfg["dry_run"] else ray_executor(cfg, session.log)


def run_discover(session: Session, cfg: Resolved) -> None:
    """Means, sweep, discovery and scores; the run folder; a summary on stdout."""
    from meanablate.cli.estimates import plan_run, show_estimate
    from meanablate.cli.pipeline import compute_or_load_means, run_discovery, write_run
    from meanablate.cli.tables import print_summary

    with _executor(cfg, session) as executor:
        t = time.perf_counter()
        inputs, out = _load(session, cfg)
        load_s = time.perf_counter() - t
        session.log(
            f"{inputs.name}: {len(inputs.units)} units, {inputs.n_examples} examples"
            + ("" if cfg["dry_run"] else f" -> {out}")
        )
        if cfg["dry_run"]:
            means = compute_or_load_means(cfg, inputs, progress=False, log=session.log)
            planned = plan_run(session.command, cfg, inputs, means)
            show_estimate(planned, dry_run=True, log=session.log)
            return

        def on_means(means: Any) -> Any:
            planned = plan_run(session.command, cfg, inputs, means)
            show_estimate(planned, dry_run=False, log=session.log, remote=executor is not None)
            return planned.sweep if executor is None else None

        results, means = run_discovery(
            cfg,
            inputs,
            progress=not session.quiet,
            log=session.log,
            command=session.command,
            timings={"load": load_s},
            executor=executor,
            on_means=on_means,
        )
    # One measurement of the run time, for results.json (the report) and the terminal.
    total = time.perf_counter() - session.started
    results["timings"]["total"] = total
    session.log("writing results.json and the report")
    write_run(out, results, means, on_results=lambda: setattr(session, "results_written", True))
    _write_dot(out, results)
    print_summary(results, out, total, inputs.ground_truth)


def _write_dot(out: Path, results: dict) -> None:
    """``circuit.dot``: the circuit for graphviz (units with their sweep effects)."""
    from meanablate.discovery import Circuit

    c = results["circuit"]
    units = [u["name"] for u in results["units"]]
    scores = {u["name"]: u["effect"] for u in results["units"]}
    circuit = Circuit(
        c["algorithm"],
        units,
        list(c["units"]),
        scores,
        results["metric"]["name"],
        c["metric_full"],
        c["metric_circuit"],
        c["metric_empty"],
    )
    (out / "circuit.dot").write_text(circuit.to_dot(title=results.get("title")))


def run_scores(session: Session, cfg: Resolved) -> None:
    """``means``, ``sweep`` or ``attribute`` (``session.command``): its file in the run folder."""
    import meanablate as ma
    from meanablate.cli.estimates import plan_run, show_estimate
    from meanablate.cli.pipeline import compute_or_load_means, unit_cis, write_means
    from meanablate.cli.tables import print_scores
    from meanablate.results.api import write_scores_run

    command, progress = session.command, not session.quiet
    with _executor(cfg, session) as executor:
        inputs, out = _load(session, cfg)
        means = compute_or_load_means(
            cfg, inputs, progress=progress, log=session.log, executor=executor
        )
        if command == "means":
            if means is None:
                raise InputError("--method zero needs no means; nothing to compute")
            path = out / "means.safetensors"
            write_means(means, path)
            how = "per position, " if means.per_position else ""
            print(f"means of {len(means.keys())} sites ({how}{inputs.n_examples} examples): {path}")
            return
        planned = plan_run(command, cfg, inputs, means)
        show_estimate(
            planned, dry_run=bool(cfg["dry_run"]), log=session.log, remote=executor is not None
        )
        if cfg["dry_run"]:
            return
        if means is not None and not cfg["means"]:
            write_means(means, out / "means.safetensors")
        kind = "sweep" if command == "sweep" else "attribution"
        session.log(f"{kind}: {len(inputs.units)} units, metric {inputs.metric}")
        run = ma.sweep if command == "sweep" else ma.attribute
        metric = inputs.metric
        extra: dict[str, Any] = {"progress": progress} if command == "sweep" else {}
        if command == "attribute" and metric == "accuracy":
            metric = "loss"  # accuracy has no gradient
        if executor is None:  # the calibration's units are not computed again
            scores = planned.total.run(progress=progress)
        else:
            scores = run(
                inputs.model, inputs.batches, inputs.units, means,
                metric=metric, method=cfg["method"], executor=executor, **extra,
            )  # fmt: skip
    cis = unit_cis(scores.per_example, cfg["n_boot"], cfg["seed"], progress)
    saved = {k.replace("_", "-"): v for k, v in cfg.saved().items()}
    path = write_scores_run(out, scores, cis, saved, name=inputs.name)
    print_scores(kind, scores, cis, path)
