"""Calibrating discovery: the set metric, a few ACDC trials, and the ranking it uses."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from meanablate.discovery.minimal import check_behaviour
from meanablate.discovery.prune import discover
from meanablate.discovery.subsets import SetMetric
from meanablate.discovery.units import reverse_topological, unit_layer
from meanablate.estimates.result import Estimate
from meanablate.estimates.sweeps import Ctx, calibrate_sweep, estimate_attribute
from meanablate.metrics import get_metric
from meanablate.peakmem import PeakMemory

__all__ = ["check_discover_args", "estimate_discover"]


def _prune_evaluations(n: int) -> int:
    """Worst-case set evaluations of score-then-prune (see ``prune._prune_to_target``)."""
    return n if n <= 64 else 2 * math.ceil(math.log2(n)) + 1


def check_discover_args(
    algorithm: str,
    threshold: float | None,
    abs_threshold: float | None,
    target: float | None,
    max_exhaustive: int,
) -> None:
    """:func:`~meanablate.discover`'s argument checks, before any calibration runs."""
    if target is not None and not 0 < target <= 1:
        raise ValueError(f"target_faithfulness must lie in (0, 1], got {target}")
    if algorithm == "acdc":
        if threshold is not None and abs_threshold is not None:
            raise ValueError("give ACDC threshold= (relative) or abs_threshold=, not both")
        if abs_threshold is not None:
            if not math.isfinite(abs_threshold) or abs_threshold < 0:
                raise ValueError(f"abs_threshold must be a finite number >= 0, got {abs_threshold}")
        elif threshold is None or not math.isfinite(threshold) or not 0 <= threshold < 1:
            raise ValueError(
                f"ACDC needs threshold in [0, 1) or abs_threshold >= 0, got threshold={threshold}"
            )
    elif threshold is not None or abs_threshold is not None:
        raise ValueError(f"{algorithm!r} prunes to target_faithfulness; threshold is for acdc")
    if not isinstance(max_exhaustive, int) or max_exhaustive < 0:
        raise ValueError(f"max_exhaustive must be an int >= 0, got {max_exhaustive!r}")


def _certificate_worst(n: int, max_exhaustive: int) -> int:
    """Most set evaluations the removal pass and the exhaustive check can make."""
    removal = n * (n + 1) // 2  # each pass drops one unit, then tries the rest again
    exhaustive = min(max_exhaustive, 2**n - 1) if n < 64 else max_exhaustive
    return removal + exhaustive


def estimate_discover(
    ctx: Ctx, algorithm: str, n_calibrate: int, options: dict[str, Any]
) -> Estimate:
    n = len(ctx.units)
    clock = ctx.clock

    def new_set_metric() -> SetMetric:
        return SetMetric(
            ctx.model, ctx.batches, ctx.units, ctx.means, ctx.metric, method=ctx.method
        )

    t0 = clock()
    set_metric = new_set_metric()
    t_set = clock() - t0
    t0 = clock()
    full = set_metric([])
    t_full = clock() - t0
    t0 = clock()
    empty = set_metric(ctx.units)
    t_empty = clock() - t0
    check_behaviour(full, empty, force=options["force"])  # discover would refuse: say so now
    if algorithm == "acdc":
        # ACDC's j-th trial ablates unit j of the reverse order on top of those removed
        # before it: priced as if all of them were (the most hooks). A set resumes from
        # its earliest unit's block where the family allows, so a trial costs what its
        # own unit's layer costs: one trial timed per layer (the middle one of the
        # layer's trials; at most n_calibrate layers, spread), and every trial priced at
        # the nearest timed layer (none of these is reused)
        order = reverse_topological(ctx.units)
        by_layer: dict[int, list[int]] = {}
        for j, u in enumerate(order):
            by_layer.setdefault(unit_layer(u), []).append(j)
        layers = sorted(by_layer)
        k = min(max(1, n_calibrate), len(layers))
        timed = sorted(
            {layers[min(len(layers) - 1, int((i + 0.5) * len(layers) / k))] for i in range(k)}
        )
        cost: dict[int, float] = {}
        for layer in timed:
            js = by_layer[layer]
            t0 = clock()
            set_metric(order[: js[len(js) // 2] + 1])
            cost[layer] = clock() - t0
        total = sum(
            cost[min(timed, key=lambda t: abs(t - layer))] * len(js)
            for layer, js in by_layer.items()
        )
        per_eval = total / n
        picks = timed
    del set_metric
    with PeakMemory(ctx.device) as held:  # the set metric's cache stays for the whole run
        set_metric = new_set_metric()
    with PeakMemory(ctx.device) as mem:
        set_metric(ctx.units)
    del set_metric
    parts = {"set metric": t_set + t_full + t_empty}
    # the cache the set metric keeps, plus one evaluation (or building it, if more)
    peak = max(held.bytes, held.live_bytes + mem.bytes)
    calibrated = 0
    worst = algorithm != "acdc"
    if algorithm == "acdc":
        # ACDC tries every unit once, each on top of those already removed: n sets, plus
        # the full and the empty model.
        evaluations = n + 2
        parts["acdc"] = per_eval * n
        calibrated = len(picks)
        note = "ACDC: exactly n + 2 set evaluations"
    else:
        prune = _prune_evaluations(n)
        rounds = 1
        if algorithm == "attribute_verify":
            k = options["verify_top"] or max(1, math.ceil(0.1 * n))
            while k < n:
                k, rounds = min(n, math.ceil(1.25 * k)), rounds + 1
        evaluations = 2 + rounds * prune
        # every pruning set ablates the units left out of the circuit, early layers
        # included: priced as the empty circuit (everything ablated)
        parts["prune"] = rounds * prune * t_empty
        note = f"worst case: {evaluations} set evaluations"
        if algorithm in ("attribution", "attribute_verify"):
            grad = ctx if ctx.metric.name != "accuracy" else replace(ctx, metric=get_metric("loss"))
            a = estimate_attribute(grad, options["n_probes"], 0)  # discover ranks by loss
            parts["attribution"] = a.seconds
            peak = max(peak, held.live_bytes + a.peak_bytes)
            calibrated = a.calibrated_on
        if algorithm in ("sweep", "attribute_verify"):
            s_sec, _r, s_peak, s_parts = calibrate_sweep(ctx, n_calibrate)
            parts["sweep"] = s_sec
            peak = max(peak, held.live_bytes + s_peak)
            calibrated = sum(len(p.units) for p in s_parts)
            if algorithm == "attribute_verify":
                note += ", every unit verified"
    seconds = sum(parts.values())
    worst_seconds = seconds
    if options["minimize"]:
        extra = _certificate_worst(n, options["max_exhaustive"])
        worst_seconds += extra * t_empty
        note += f"; certificate: up to {extra} more"

    def run(progress: bool) -> Any:
        return discover(
            ctx.model, ctx.batches, ctx.means, units=ctx.units, metric=ctx.metric,
            algorithm=algorithm, method=ctx.method, progress=progress, **options,  # type: ignore[arg-type]
        )  # fmt: skip

    return Estimate(
        f"discover:{algorithm}", seconds, peak, n, len(ctx.batches), calibrated,
        0.0, evaluations, worst_case=worst, parts=parts, note=note, runner=run,
        worst_seconds=worst_seconds,
    )  # fmt: skip
