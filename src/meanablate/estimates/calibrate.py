"""``estimate()``: checks the arguments, warms the model up, and hands over to the calibration
of the algorithm asked for (:mod:`.sweeps`, :mod:`.discovery`)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from meanablate._unwrap import unwrap
from meanablate.discovery.minimal import MAX_EXHAUSTIVE
from meanablate.discovery.prune import ALGORITHMS as DISCOVER_ALGORITHMS
from meanablate.discovery.sweep import check_units
from meanablate.estimates.discovery import check_discover_args, estimate_discover
from meanablate.estimates.result import Estimate, EstimateWarning
from meanablate.estimates.sweeps import Ctx, estimate_attribute, estimate_sweep
from meanablate.hooks import model_device, output_tensor, run_model, to_device
from meanablate.intervene import Method
from meanablate.metrics import Metric, get_metric
from meanablate.peakmem import available_bytes
from meanablate.stats import Means

__all__ = ["ALGORITHMS", "estimate"]

ALGORITHMS: tuple[str, ...] = (
    "sweep",
    "attribute",
    *(f"discover:{a}" for a in DISCOVER_ALGORITHMS),
)


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
        check_discover_args(
            algorithm[9:], threshold, abs_threshold, target_faithfulness, max_exhaustive
        )
    device = model_device(model)
    ctx = Ctx(model, batches, units, means, m, method, clock, device)
    start = clock()
    with torch.inference_mode():  # warm-up (lazy initialisation), not timed
        output_tensor(run_model(model, to_device(batches[0], device)))
    if algorithm == "sweep":
        est = estimate_sweep(ctx, n_calibrate)
    elif algorithm == "attribute":
        est = estimate_attribute(ctx, n_probes or 1, seed)
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
        est = estimate_discover(ctx, algorithm[9:], n_calibrate, options)
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
