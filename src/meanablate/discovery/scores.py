"""The one result type of every scoring algorithm, and ROC / rank statistics."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from meanablate._display import Shown
from meanablate.intervene import bootstrap_ci

__all__ = ["Scores", "auroc", "roc_curve", "spearman"]


@dataclass(repr=False, eq=False)
class Scores(Shown):
    """Per-unit effects from a sweep or an attribution (the shared result type).

    ``units [n]`` site strings; ``values [n]`` mean effect over examples;
    ``per_example [n, examples]``; ``exact [n]`` which values come from a real ablation
    (``False``: a linear estimate); ``method`` says which algorithm produced them.

    ``len(scores)``, ``scores[unit]`` (its value), :meth:`ranking`, :meth:`save` /
    :meth:`load` (JSON), :meth:`to_dataframe` (pandas).

    >>> import torch, meanablate as ma
    >>> s = ma.Scores.from_examples(["a.0", "a.1"], torch.tensor([[0.1, 0.3], [-1.0, -2.0]]),
    ...                             "logit_diff", "sweep", seconds=0.0)
    >>> len(s), s["a.1"], s.ranking()
    (2, -1.5, ['a.1', 'a.0'])
    """

    units: list[str]
    values: Tensor
    per_example: Tensor
    metric: str
    method: str
    exact: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.exact.numel() == 0:
            self.exact = torch.full((len(self.units),), self.method == "sweep")

    @classmethod
    def from_examples(
        cls, units: list[str], per_example: Tensor, metric: str, method: str, seconds: float
    ) -> Scores:
        """Scores whose values are the per-example effects' means (exact for a sweep)."""
        per_example = per_example.double().cpu()
        exact = torch.full((len(units),), method == "sweep")
        return cls(
            units, per_example.mean(1), per_example, metric, method, exact=exact, seconds=seconds
        )

    def as_dict(self) -> dict[str, float]:
        """``{unit: value}``."""
        return dict(zip(self.units, self.values.tolist()))

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, unit: str) -> float:
        """The value of one unit, by its site string."""
        try:
            return float(self.values[self.units.index(unit)])
        except ValueError:
            raise KeyError(f"no unit {unit!r} among the {len(self.units)} scored") from None

    def __contains__(self, unit: object) -> bool:
        return unit in self.units

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Scores):
            return NotImplemented
        return (
            (self.units, self.metric, self.method, self.seconds)
            == (other.units, other.metric, other.method, other.seconds)
            and torch.equal(self.values, other.values)
            and torch.equal(self.exact, other.exact)
            and self.per_example.shape == other.per_example.shape
            and torch.equal(self.per_example.double(), other.per_example.double())
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of these scores (the CLI's ``sweep.json`` format, per-example
        effects included): :meth:`from_dict` gives back equal scores."""
        from meanablate.results.persist import scores_to_dict

        return scores_to_dict(self)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Scores:
        """Scores from :meth:`to_dict`'s object (validated; errors name the path)."""
        from meanablate.results.persist import scores_from_dict

        return scores_from_dict(obj)

    def save(self, path: str | os.PathLike[str], *, n_boot: int = 0, seed: int = 0) -> Path:
        """Write JSON atomically (``n_boot`` > 0 adds bootstrap intervals per unit)."""
        from meanablate.results.persist import save_scores

        return save_scores(self, path, n_boot=n_boot, seed=seed)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Scores:
        """Read scores written by :meth:`save` or by the CLI (``sweep.json``)."""
        from meanablate.results.persist import load_scores

        return load_scores(path)

    def magnitude(self) -> Tensor:
        """``|values|``: how much each unit matters, whatever the metric's sign."""
        return self.values.abs()

    def ranking(self) -> list[str]:
        """Units by decreasing ``|value|`` (ties keep the input order)."""
        order = torch.argsort(-self.magnitude(), stable=True)
        return [self.units[i] for i in order.tolist()]

    def ci(self, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Tensor:
        """Bootstrap intervals of each unit's mean effect over examples: ``[n, 2]``."""
        return torch.tensor(
            [bootstrap_ci(row, n_boot=n_boot, level=level, seed=seed) for row in self.per_example],
            dtype=torch.float64,
        )


def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> tuple[list[float], list[float]]:
    """False- and true-positive rates as the threshold sweeps down through ``scores``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("ROC needs both ground-truth positives and negatives")
    fpr, tpr = [0.0], [0.0]
    for t in np.unique(s)[::-1]:
        keep = s >= t
        tpr.append(float((keep & y).sum() / y.sum()))
        fpr.append(float((keep & ~y).sum() / (~y).sum()))
    return fpr, tpr


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (ties count one half: the Mann-Whitney statistic)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("AUROC needs both ground-truth positives and negatives")
    pos, neg = s[y], s[~y]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def spearman(a: Sequence[float] | Tensor, b: Sequence[float] | Tensor) -> float:
    """Spearman rank correlation of two score vectors."""
    from scipy.stats import spearmanr

    x = np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float64)
    y = np.asarray(b.detach().cpu() if isinstance(b, Tensor) else b, dtype=np.float64)
    return float(spearmanr(x, y).statistic)
