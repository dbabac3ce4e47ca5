"""Calibration: a few units run for real, timed and measured, extrapolated to the run."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from meanablate._unwrap import unwrap
from meanablate.discovery.attribution import attribute
from meanablate.discovery.minimal import MAX_EXHAUSTIVE, check_behaviour
from meanablate.discovery.prune import ALGORITHMS as DISCOVER_ALGORITHMS
from meanablate.discovery.prune import discover
from meanablate.discovery.scores import Scores
from meanablate.discovery.subsets import SetMetric
from meanablate.discovery.sweep import check_units, sweep
from meanablate.discovery.units import reverse_topological, unit_layer
from meanablate.estimates.result import Estimate, EstimateWarning
from meanablate.hooks import model_device, output_tensor, run_model, to_device
from meanablate.intervene import Method
from meanablate.metrics import Metric, get_metric
from meanablate.peakmem import PeakMemory, available_bytes
from meanablate.stats import Means

__all__ = ["ALGORITHMS", "estimate"]

ALGORITHMS: tuple[str, ...] = (
    "sweep",
    "attribute",
    *(f"discover:{a}" for a in DISCOVER_ALGORITHMS),
)


@dataclass
class _Ctx:
    model: nn.Module
    batches: list[Any]
    units: list[str]
    means: Means | None
    metric: Metric
    method: Method
    clock: Callable[[], float]
    device: torch.device


def _spread(units: Sequence[str], k: int) -> list[str]:
    """``k`` units evenly spread over ``units`` ordered by layer (a proportional sample)."""
    order = sorted(range(len(units)), key=lambda i: unit_layer(units[i]))
    picked = sorted({order[min(len(units) - 1, int((i + 0.5) * len(units) / k))] for i in range(k)})
    return [units[i] for i in picked]


def _plain_forwards(ctx: _Ctx) -> float:
    """Seconds for one plain forward per batch (what a sweep pays once per batch)."""
    t0 = ctx.clock()
    with torch.inference_mode():
        for b in ctx.batches:
            output_tensor(run_model(ctx.model, to_device(b, ctx.device)))
    return ctx.clock() - t0


def _result_bytes(n_units: int, n_examples: int) -> int:
    # each unit's float64 effects, held per batch and again once concatenated
    return 2 * 8 * n_units * n_examples


def _calibrate_sweep(ctx: _Ctx, k: int) -> tuple[float, float, int, list[Scores]]:
    """``(seconds, reused seconds, peak bytes, calibrated scores)`` of a sweep of all units.

    Two calibrated units run under the memory counter (two, so that one unit's logits
    are still alive while the next one's are made, as in the run). The rest are timed in
    two sweeps, of one unit and of the others: the difference prices a unit, and what is
    left of the first is the run's fixed cost (its clean forwards), on the run's own code
    path. With fewer than three units left, the fixed cost is priced as plain forwards.
    """
    n = len(ctx.units)
    sample = ctx.units if k >= n else _spread(ctx.units, k)
    mem_units, rest = (sample[:2], sample[2:]) if len(sample) > 2 else (sample, sample)
    kw = {"metric": ctx.metric, "method": ctx.method}

    def swept(units: list[str]) -> tuple[float, Scores]:
        t0 = ctx.clock()
        out = sweep(ctx.model, ctx.batches, units, ctx.means, **kw)  # type: ignore[arg-type]
        return ctx.clock() - t0, out

    with PeakMemory(ctx.device) as mem:
        parts = [sweep(ctx.model, ctx.batches, mem_units, ctx.means, **kw)]  # type: ignore[arg-type]
    if len(rest) >= 3:
        (t_a, a), (t_b, b) = swept(rest[:1]), swept(rest[1:])
        per_unit = max(0.0, t_b - t_a) / (len(rest) - 2)
        fixed = max(0.0, t_a - per_unit)
        parts += [a, b]
    else:
        fixed = _plain_forwards(ctx)
        t_s, part = swept(rest)
        per_unit = max(0.0, t_s - fixed) / len(rest)
        if rest is not sample:
            parts.append(part)
    done = len(set(mem_units) | set(rest))
    n_examples = int(parts[0].per_example.shape[1])
    peak = mem.bytes + _result_bytes(n - len(mem_units), n_examples)
    seconds = fixed + per_unit * n
    return seconds, seconds if done == n else per_unit * done, peak, parts


def _batch_size(batch: Any) -> int:
    t = (
        batch
        if isinstance(batch, Tensor)
        else next((v for v in batch.values() if isinstance(v, Tensor)), None)
    )
    return int(t.numel()) if t is not None else 1


def _merge_sweep(units: list[str], parts: Iterable[Scores], metric: str) -> Scores:
    rows: dict[str, Tensor] = {}
    seconds = 0.0
    for s in parts:
        seconds += s.seconds
        rows.update(zip(s.units, s.per_example))
    return Scores.from_examples(
        units, torch.stack([rows[u] for u in units]), metric, "sweep", seconds
    )


def _prune_evaluations(n: int) -> int:
    """Worst-case set evaluations of score-then-prune (see ``prune._prune_to_target``)."""
    return n if n <= 64 else 2 * math.ceil(math.log2(n)) + 1


def _check_discover_args(
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


def estimate(
    model: nn.Module,
    batches: Iterable[Tensor | Mapping[str, Any]],
    units: Sequence[str],
    means: Means | None,
    *,
    metric: str | Metric = "kl",
    algorithm: str = "sweep",
    method: Method = "mean",
    n_calibrate: int = 16,
    n_probes: int | None = None,
    seed: int = 0,
    threshold: float | None = None,
    abs_threshold: float | None = None,
    target_faithfulness: float | None = None,
    verify_top: int | None = None,
    force: bool = False,
    minimize: bool = True,
    max_exhaustive: int = MAX_EXHAUSTIVE,
    clock: Callable[[], float] = time.perf_counter,
    warn: bool = True,
) -> Estimate:
    """Time and peak memory of a run, from ``n_calibrate`` units run for real.

    ``algorithm``: ``"sweep"``, ``"attribute"``, or ``"discover:<name>"`` for
    :func:`~meanablate.discover` with ``algorithm=<name>`` (``"acdc"``,
    ``"attribution"`` and ``"attribute_verify"`` may be given bare). The other arguments
    are those of the function estimated. ``clock``: seconds as a float (for tests).
    Discovery's certificate (the removal pass and the exhaustive check, ``minimize``)
    depends on the circuit it finds: ``seconds`` leaves it out, ``worst_seconds`` adds
    its worst case (a removal pass that drops one unit per pass, and every subset the
    exhaustive check may try).
    Warns (:class:`EstimateWarning`) when the run would take over an hour or more memory than
    is available (``warn=False``: only ``Estimate.warnings()`` says so).

    >>> import meanablate as ma, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> batches = [torch.randn(16, 4)]
    >>> units = [f"1[neurons={i}]" for i in range(8)]
    >>> means = ma.compute_means(model, ["1"], batches)
    >>> est = ma.estimate(model, batches, units, means, metric="l2", n_calibrate=2)
    >>> (est.n_units, est.calibrated_on, est.seconds > 0)
    (8, 2, True)
    >>> est.run().values.shape
    torch.Size([8])
    """
    if algorithm in DISCOVER_ALGORITHMS and algorithm not in ("sweep",):
        algorithm = f"discover:{algorithm}"
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {algorithm!r}")
    if not isinstance(n_calibrate, int) or n_calibrate < 1:
        raise ValueError(f"n_calibrate must be a positive int, got {n_calibrate!r}")
    model = unwrap(model)  # an nnsight wrapper: its module
    m = get_metric(metric)
    units = check_units(model, units)
    batches = list(batches)
    if not batches:
        raise ValueError("estimate needs at least one batch")
    if algorithm.startswith("discover:"):
        _check_discover_args(
            algorithm[9:], threshold, abs_threshold, target_faithfulness, max_exhaustive
        )
    device = model_device(model)
    ctx = _Ctx(model, batches, units, means, m, method, clock, device)
    start = clock()
    with torch.inference_mode():  # warm-up (lazy initialisation), not timed
        output_tensor(run_model(model, to_device(batches[0], device)))
    if algorithm == "sweep":
        est = _estimate_sweep(ctx, n_calibrate)
    elif algorithm == "attribute":
        est = _estimate_attribute(ctx, n_probes or 1, seed)
    else:
        options = {
            "threshold": threshold,
            "abs_threshold": abs_threshold,
            "target_faithfulness": target_faithfulness,
            "verify_top": verify_top,
            "n_probes": n_probes or 4,
            "force": force,
            "minimize": minimize,
            "max_exhaustive": max_exhaustive,
        }
        est = _estimate_discover(ctx, algorithm[9:], n_calibrate, options)
    est = replace(
        est,
        calibration_seconds=clock() - start,
        available_bytes=available_bytes(device),
        device=str(device),
    )
    if warn:
        for w in est.warnings():
            warnings.warn(w, EstimateWarning, stacklevel=2)
    return est


def _estimate_sweep(ctx: _Ctx, n_calibrate: int) -> Estimate:
    n = len(ctx.units)
    seconds, reused, peak, calibrated = _calibrate_sweep(ctx, n_calibrate)
    done = {u for s in calibrated for u in s.units}

    def run(progress: bool) -> Scores:
        rest = [u for u in ctx.units if u not in done]
        parts = list(calibrated)
        if rest:
            parts.append(
                sweep(
                    ctx.model,
                    ctx.batches,
                    rest,
                    ctx.means,
                    metric=ctx.metric,
                    method=ctx.method,
                    progress=progress,
                )
            )
        return _merge_sweep(ctx.units, parts, ctx.metric.name)

    return Estimate(
        "sweep", seconds, peak, n, len(ctx.batches), len(done), 0.0,
        n * len(ctx.batches), parts={"sweep": seconds}, reused_seconds=reused, runner=run,
    )  # fmt: skip


def _estimate_attribute(ctx: _Ctx, n_probes: int, seed: int) -> Estimate:
    """Batch 0 runs under the memory counter, batch 1 (or 0 again) is timed; per example
    token the time scales to every batch."""
    kw = {"metric": ctx.metric, "method": ctx.method, "n_probes": n_probes, "seed": seed}
    model, units, means, batches = ctx.model, ctx.units, ctx.means, ctx.batches
    with PeakMemory(ctx.device) as mem:
        first = attribute(model, batches[:1], units, means, **kw)  # type: ignore[arg-type]
    i = 1 if len(batches) > 1 else 0
    t0 = ctx.clock()
    second = attribute(model, batches[i : i + 1], units, means, **kw)  # type: ignore[arg-type]
    t1 = ctx.clock() - t0
    sizes = [_batch_size(b) for b in batches]
    seconds = t1 * sum(sizes) / sizes[i]
    peak = int(mem.bytes * max(sizes) / sizes[0])
    # The random probes of kl/l2/mse run on in one stream over the batches: batches
    # computed alone match the run only when the first is the whole run.
    probed = ctx.metric.compares or ctx.metric.name == "mse"
    reusable = len(batches) == 1 or not probed
    note = "" if reusable else "calibration batches re-run (probes are seeded per run)"
    done = [first] if i == 0 else [first, second]

    def run(progress: bool) -> Scores:
        if len(batches) == 1:
            return first
        todo = batches[len(done) :] if reusable else batches
        rest = attribute(model, todo, units, means, **kw) if todo else None  # type: ignore[arg-type]
        if not reusable:
            return rest
        got = [*done, rest] if rest is not None else done
        per_example = torch.cat([s.per_example for s in got], dim=1)
        secs = sum(s.seconds for s in got)
        return Scores.from_examples(units, per_example, ctx.metric.name, "attribution", secs)

    passes = len(batches) * max(1, n_probes if probed else 1)
    reused = t1 * sum(sizes[: len(done)]) / sizes[i] if reusable else 0.0
    return Estimate(
        "attribute", seconds, peak, len(units), len(batches), len(done), 0.0, passes,
        parts={"attribute": seconds}, note=note, reused_seconds=reused, runner=run,
    )  # fmt: skip


def _estimate_discover(
    ctx: _Ctx, algorithm: str, n_calibrate: int, options: dict[str, Any]
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
        # before it: priced as if all of them were (the most hooks), on at most an
        # eighth of the trials (none of these is reused)
        order = reverse_topological(ctx.units)
        k = min(n_calibrate, n, max(2, n // 8))
        picks = [min(n - 1, int((i + 0.5) * n / k)) for i in range(k)]
        t0 = clock()
        for j in picks:
            set_metric(order[: j + 1])
        per_eval = (clock() - t0) / len(picks)
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
            a = _estimate_attribute(grad, options["n_probes"], 0)  # discover ranks by loss
            parts["attribution"] = a.seconds
            peak = max(peak, held.live_bytes + a.peak_bytes)
            calibrated = a.calibrated_on
        if algorithm in ("sweep", "attribute_verify"):
            s_sec, _r, s_peak, s_parts = _calibrate_sweep(ctx, n_calibrate)
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
