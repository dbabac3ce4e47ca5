"""The estimate a run command shows before the long work, and ``--dry-run``, which stops there.

The estimate is :func:`meanablate.estimate` of each step still to come once the means are
known (sweep, attribution, discovery), summed; the sweep's calibrated units are handed to
the run, which does not compute them again. Runs estimated over an hour, or over the free
memory, get a ``warning:`` line on stderr even with ``--quiet``.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

from meanablate.cli.records import Inputs, Log
from meanablate.config import Resolved

__all__ = ["Planned", "plan_run", "show_estimate"]


@dataclass
class Planned:
    """The estimate of a command's remaining steps, and the sweep's to run (reusing it)."""

    total: Any
    sweep: Any = None


def _attribution_metric(metric: str) -> str:
    return "loss" if metric == "accuracy" else metric  # accuracy has no gradient


def plan_run(command: str, cfg: Resolved, inputs: Inputs, means: Any) -> Planned:
    """Calibrate and estimate what ``command`` will run on ``inputs`` after the means."""
    import meanablate as ma
    from meanablate.cli.pipeline import discover_options
    from meanablate.estimates import EstimateWarning

    args = (inputs.model, inputs.batches, inputs.units, means)
    method = cfg["method"]
    with warnings.catch_warnings():  # show_estimate says it once, as a warning: line
        warnings.simplefilter("ignore", EstimateWarning)
        if command == "attribute":
            metric = _attribution_metric(inputs.metric)
            est = ma.estimate(*args, metric=metric, method=method, algorithm="attribute")
            return Planned(est)
        sweep = ma.estimate(*args, metric=inputs.metric, method=method, algorithm="sweep")
        if command == "sweep":
            return Planned(sweep, sweep)
        total = sweep
        if cfg["attribution"]:
            metric = _attribution_metric(inputs.metric)
            total = total + ma.estimate(*args, metric=metric, method=method, algorithm="attribute")
        algorithm = cfg["algorithm"]
        found = ma.estimate(
            *args,
            metric=inputs.metric,
            method=method,
            algorithm=f"discover:{algorithm}",
            **discover_options(cfg),
        )
        return Planned(total + found, sweep)


def _breakdown(est: Any) -> str:
    from meanablate.estimates.result import _duration

    return ", ".join(f"{k} ~{_duration(v)}" for k, v in est.parts.items())


def show_estimate(planned: Planned, *, dry_run: bool, log: Log, remote: bool = False) -> None:
    """The estimate on stdout (``--dry-run``) or as a log line, and its warnings on stderr."""
    est = planned.total
    line = est.summary() + (" (for this process; the Ray workers may differ)" if remote else "")
    if dry_run:
        print(line)
        if len(est.parts) > 1:
            print(f"  {_breakdown(est)}")
        print("dry run: stopped before the run; nothing written")
    else:
        log(line)
    for w in est.warnings():
        print(f"warning: {w}", file=sys.stderr, flush=True)
