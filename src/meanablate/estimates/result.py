"""The result of :func:`~meanablate.estimate`: predicted time and memory, and the run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LONG_RUN_SECONDS", "Estimate", "EstimateWarning"]

LONG_RUN_SECONDS = 3600.0  # warn before a run longer than this


class EstimateWarning(UserWarning):
    """A run is estimated to take over an hour, or more memory than is available."""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.2g} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


@dataclass(frozen=True)
class Estimate:
    """Predicted ``seconds`` and ``peak_bytes`` of a run, from a short calibration.

    ``peak_bytes``: working memory above what is allocated when the run starts (the model
    and data are already there). ``calibrated_on``: units (sweep, discovery) or batches
    (attribution) run for real. ``evaluations``: single-unit ablations times batches for a
    sweep, forward+backward passes for attribution, set evaluations for discovery
    (the worst case when ``worst_case``). ``parts``: seconds per phase.
    ``reused_seconds``: the part of ``seconds`` the calibration already did and
    :meth:`run` will not repeat. ``worst_seconds``: with what ``seconds`` leaves out
    at its worst (discovery's certificate), when that is more.

    >>> from meanablate.estimates import Estimate
    >>> e = Estimate("sweep", seconds=90.0, peak_bytes=2**20, n_units=8, n_batches=4,
    ...              calibrated_on=2, calibration_seconds=1.0, evaluations=32)
    >>> e.remaining_seconds
    90.0
    """

    algorithm: str
    seconds: float
    peak_bytes: int
    n_units: int
    n_batches: int
    calibrated_on: int
    calibration_seconds: float
    evaluations: int
    worst_case: bool = False
    parts: Mapping[str, float] = field(default_factory=dict)
    available_bytes: int | None = None
    device: str = "cpu"
    note: str = ""
    reused_seconds: float = 0.0
    worst_seconds: float | None = None
    runner: Callable[..., Any] | None = field(default=None, repr=False, compare=False)

    @property
    def remaining_seconds(self) -> float:
        """What :meth:`run` will still take."""
        return max(0.0, self.seconds - self.reused_seconds)

    def warnings(self) -> list[str]:
        """Why the run may be a bad idea: longer than an hour, or more memory than is free."""
        out = []
        if self.seconds > LONG_RUN_SECONDS:
            out.append(
                f"{self.algorithm} is estimated to take {_duration(self.seconds)} "
                f"(over {_duration(LONG_RUN_SECONDS)})"
            )
        if self.available_bytes is not None and self.peak_bytes > self.available_bytes:
            out.append(
                f"{self.algorithm} is estimated to need {_size(self.peak_bytes)} of memory on "
                f"{self.device}, more than the {_size(self.available_bytes)} available"
            )
        return out

    def summary(self) -> str:
        """One line: what, how long, how much memory, and what it rests on."""
        worst = " (worst case)" if self.worst_case else ""
        what = f"{self.n_units} units x {self.n_batches} batch{'es' * (self.n_batches != 1)}"
        noun = "batch" if self.algorithm in ("attribute", "discover:attribution") else "unit"
        plural = ("es" if noun == "batch" else "s") * (self.calibrated_on != 1)
        return (
            f"estimate: {self.algorithm} of {what}: ~{_duration(self.seconds)}{worst}"
            + (
                f" (up to {_duration(self.worst_seconds)} with the certificate)"
                if self.worst_seconds is not None and self.worst_seconds > 1.05 * self.seconds
                else ""
            )
            + ", "
            f"peak ~{_size(self.peak_bytes)} on {self.device} "
            f"(calibrated on {self.calibrated_on} {noun}{plural} "
            f"in {_duration(self.calibration_seconds)}"
            + (f"; {self.note}" if self.note else "")
            + ")"
        )

    def __repr__(self) -> str:
        return "Estimate(" + self.summary().removeprefix("estimate: ") + ")"

    def run(self, *, progress: bool = False) -> Any:
        """Do the estimated work (``Scores`` or ``Circuit``), reusing the calibration."""
        if self.runner is None:
            raise ValueError("this estimate has nothing to run (a sum of estimates, say)")
        return self.runner(progress)

    def __add__(self, other: Estimate) -> Estimate:
        """Two runs one after the other: times add, the peak is the larger one."""
        return Estimate(
            f"{self.algorithm} + {other.algorithm}",
            self.seconds + other.seconds,
            max(self.peak_bytes, other.peak_bytes),
            max(self.n_units, other.n_units),
            max(self.n_batches, other.n_batches),
            max(self.calibrated_on, other.calibrated_on),
            self.calibration_seconds + other.calibration_seconds,
            self.evaluations + other.evaluations,
            self.worst_case or other.worst_case,
            {**self.parts, **other.parts},
            self.available_bytes,
            self.device,
            "; ".join(n for n in (self.note, other.note) if n),
            self.reused_seconds + other.reused_seconds,
            worst_seconds=(
                None
                if self.worst_seconds is None and other.worst_seconds is None
                else (self.worst_seconds or self.seconds) + (other.worst_seconds or other.seconds)
            ),
        )
