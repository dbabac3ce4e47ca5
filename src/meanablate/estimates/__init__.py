"""Estimates before long work: the time and peak memory of a sweep, attribution or discovery.

:func:`estimate` runs a few units for real, through the same functions the run will call
(:func:`~meanablate.sweep`, :func:`~meanablate.attribute`, the pruning's set metric), times
them and measures their peak memory (:class:`~meanablate.peakmem.PeakMemory`), and
extrapolates to every unit and batch. For discovery the count of set evaluations is the
algorithm's worst case (``Estimate.worst_case``): ACDC evaluates exactly ``n + 2`` sets,
score-then-prune at most ``n`` (up to 64 units) or ``2 ceil(log2 n) + 1``, and
attribute-then-verify may verify every unit. :meth:`Estimate.run` then does the work,
reusing what the calibration computed (the sweep's calibrated units, the attribution's
first batch for task metrics)::

    est = ma.estimate(model, batches, units, means, metric="kl")
    print(est)            # Estimate(sweep: 512 units x 1 batch: ~3.1 s, peak ~40 MiB, ...)
    scores = est.run()    # the sweep, without re-running the calibrated units
"""

from meanablate.estimates.calibrate import ALGORITHMS, estimate
from meanablate.estimates.result import LONG_RUN_SECONDS, Estimate, EstimateWarning

__all__ = ["ALGORITHMS", "LONG_RUN_SECONDS", "Estimate", "EstimateWarning", "estimate"]
