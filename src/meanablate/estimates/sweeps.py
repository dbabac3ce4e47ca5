"""Calibrating sweeps and attribution: a few units (or batches) run, timed and measured."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from meanablate.discovery.attribution import attribute
from meanablate.discovery.scores import Scores
from meanablate.discovery.sweep import sweep
from meanablate.discovery.units import unit_layer
from meanablate.estimates.result import Estimate
from meanablate.hooks import output_tensor, run_model, to_device
from meanablate.intervene import Method
from meanablate.metrics import Metric
from meanablate.peakmem import PeakMemory
from meanablate.stats import Means

__all__ = ["Ctx", "calibrate_sweep", "estimate_attribute", "estimate_sweep", "spread"]


@dataclass
class Ctx:
    model: nn.Module
    batches: list[Any]
    units: list[str]
    means: Means | None
    metric: Metric
    method: Method
    clock: Callable[[], float]
    device: torch.device


def spread(units: Sequence[str], k: int) -> list[str]:
    """``k`` units evenly spread over ``units`` ordered by layer (a proportional sample)."""
    order = sorted(range(len(units)), key=lambda i: unit_layer(units[i]))
    picked = sorted({order[min(len(units) - 1, int((i + 0.5) * len(units) / k))] for i in range(k)})
    return [units[i] for i in picked]


def _plain_forwards(ctx: Ctx) -> float:
    """Seconds for one plain forward per batch (what a sweep pays once per batch)."""
    t0 = ctx.clock()
    with torch.inference_mode():
        for b in ctx.batches:
            output_tensor(run_model(ctx.model, to_device(b, ctx.device)))
    return ctx.clock() - t0


def _result_bytes(n_units: int, n_examples: int) -> int:
    # each unit's float64 effects, held per batch and again once concatenated
    return 2 * 8 * n_units * n_examples


def calibrate_sweep(ctx: Ctx, k: int) -> tuple[float, float, int, list[Scores]]:
    """``(seconds, reused seconds, peak bytes, calibrated scores)`` of a sweep of all units.

    Two calibrated units run under the memory counter (two, so that one unit's logits
    are still alive while the next one's are made, as in the run). The rest are timed in
    two sweeps, of one unit and of the others: the difference prices a unit, and what is
    left of the first is the run's fixed cost (its clean forwards), on the run's own code
    path. With fewer than three units left, the fixed cost is priced as plain forwards.
    """
    n = len(ctx.units)
    sample = ctx.units if k >= n else spread(ctx.units, k)
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


def estimate_sweep(ctx: Ctx, n_calibrate: int) -> Estimate:
    n = len(ctx.units)
    seconds, reused, peak, calibrated = calibrate_sweep(ctx, n_calibrate)
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


def estimate_attribute(ctx: Ctx, n_probes: int, seed: int) -> Estimate:
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
