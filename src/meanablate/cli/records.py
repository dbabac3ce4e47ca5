"""What the loaders of :mod:`meanablate.cli.inputs` return: :class:`Inputs` (a model with its
data, units, metric and ground truth), and the logger type they and the pipeline take."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["Inputs", "Log", "default_metric", "quiet_log"]

Log = Callable[[str], None]  # a logger: one message, to stderr


def quiet_log(_msg: str) -> None:
    """A logger that says nothing."""


@dataclass
class Inputs:
    """A model with its data and candidate units, ready for discovery."""

    name: str
    model: nn.Module
    batches: list[Any]
    units: list[str]
    metric: str
    ground_truth: list[str] | None
    per_position: bool
    source: str  # "organism", "huggingface" or "custom"
    description: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    mean_kind: str | None = None  # None: per_position decides (per_position or plain)
    keep_positions: list[int] | None = None  # plain_except only; None: [0] (BOS)

    @property
    def effective_mean_kind(self) -> str:
        return self.mean_kind or ("per_position" if self.per_position else "plain")

    @property
    def n_examples(self) -> int:
        from meanablate.hooks import batch_size_of

        return sum(batch_size_of(b) for b in self.batches)


def default_metric(batch: Any) -> str:
    """The metric a batch's fields call for: its answers' (``target``/``wrong``), else ``kl``."""
    if not isinstance(batch, Mapping):
        return "kl"
    if "target" in batch:
        return "logit_diff" if "wrong" in batch else "loss"
    return "mse" if "target_value" in batch else "kl"
