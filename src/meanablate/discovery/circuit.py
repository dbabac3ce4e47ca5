"""The result of pruning: :class:`Circuit`, the units kept and what is proven about them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meanablate._display import Shown
from meanablate.discovery.evaluate import faithfulness
from meanablate.discovery.scores import Scores, auroc, roc_curve

__all__ = ["Circuit"]


@dataclass(repr=False)
class Circuit(Shown):
    """The units kept, their scores, and the metric for full / circuit / empty models.

    ``scores``: per unit, the evidence the algorithm used (ACDC: the metric change when
    the unit was tried; score-based: the unit's effect). ``curve``: faithfulness against
    circuit size for score-based algorithms (``(size, faithfulness)`` pairs).

    ``len(circuit)``: units kept; ``unit in circuit``: kept or not; ``circuit[unit]``: its
    score. :meth:`save` / :meth:`load` (``results.json``), :meth:`to_dataframe` (pandas).

    >>> import meanablate as ma
    >>> c = ma.Circuit("acdc", ["a.0", "a.1"], ["a.1"], {"a.0": 0.0, "a.1": 0.5}, "kl",
    ...                metric_full=0.0, metric_circuit=0.01, metric_empty=1.2, threshold=0.1)
    >>> len(c), "a.1" in c, c["a.1"]
    (1, True, 0.5)
    """

    algorithm: str
    units: list[str]
    kept: list[str]
    scores: dict[str, float]
    metric: str
    metric_full: float
    metric_circuit: float
    metric_empty: float
    threshold: float | None = None
    target_faithfulness: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    unit_scores: Scores | None = None
    seconds: float = 0.0
    certificate: str = "none"
    abs_threshold: float | None = None
    behaviour: float = float("nan")
    behaviour_ci: tuple[float, float] | None = None
    removed_by_pass: list[str] = field(default_factory=list)
    subsets_checked: int = 0
    mean_kind: str | None = None
    keep_positions: list[int] | None = None  # plain_except means: own-mean positions

    @property
    def certificate_text(self) -> str:
        """One line saying what :attr:`certificate` proves."""
        tf = self.target_faithfulness
        # ACDC circuits have a threshold, not a target
        target = "its threshold" if tf is None else f"faithfulness >= {tf:g}"
        if self.certificate == "exhaustive":
            return (
                f"exhaustive: no subset of fewer than {len(self.kept)} units reaches "
                f"{target} ({self.subsets_checked} subsets checked)"
            )
        if self.certificate == "1-minimal":
            return f"1-minimal: removing any one kept unit falls below {target}"
        return "none: the circuit was not minimised"

    @property
    def notes(self) -> list[str]:
        """Why a faithfulness outside [0, 1] is not an error, where it is."""
        from meanablate.discovery.evaluate import score_notes

        return score_notes(self.faithfulness, None, None)

    @property
    def faithfulness(self) -> float:
        return faithfulness(self.metric_circuit, self.metric_full, self.metric_empty)

    def roc(self, ground_truth: Sequence[str]) -> tuple[list[float], list[float], float]:
        """``(fpr, tpr, auroc)`` of the unit scores against a ground-truth circuit."""
        truth = set(ground_truth)
        missing = truth - set(self.units)
        if missing:
            raise ValueError(f"ground-truth units not among the units: {sorted(missing)}")
        s = [abs(self.scores[u]) for u in self.units]
        y = [u in truth for u in self.units]
        fpr, tpr = roc_curve(s, y)
        return fpr, tpr, auroc(s, y)

    def __len__(self) -> int:
        """The number of units kept."""
        return len(self.kept)

    def __contains__(self, unit: object) -> bool:
        """Whether ``unit`` is kept."""
        return unit in self.kept

    def __getitem__(self, unit: str) -> float:
        """The score of one unit (kept or not), by its site string."""
        if unit not in self.scores:
            raise KeyError(f"no unit {unit!r} among the circuit's {len(self.units)} units")
        return self.scores[unit]

    def save(self, path: str | os.PathLike[str], **context: Any) -> Path:
        """Write a ``results.json`` (a folder: ``folder/results.json``), atomically.

        ``context``: what else to record, as for :func:`meanablate.report` (``sweep=``,
        ``attribution=``, ``ground_truth=``, ``name=``...). :meth:`load` gives back an equal
        circuit.
        """
        from meanablate.results.persist import save_circuit

        return save_circuit(self, path, **context)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Circuit:
        """Read the circuit of a ``results.json`` (or of a run folder), validated."""
        from meanablate.results.persist import load_circuit

        return load_circuit(path)

    def to_dot(self, *, top_k: int | None = None, title: str | None = None) -> str:
        """Graphviz DOT of the circuit (see :func:`meanablate.discovery.dot.circuit_to_dot`)."""
        from meanablate.discovery.dot import circuit_to_dot

        return circuit_to_dot(self, top_k=top_k, title=title)
