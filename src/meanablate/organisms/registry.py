"""The registry of built-in organisms: ``load(name)`` and ``names()``.

Each organism bundles a model, a data-set maker, the metric that fits its task, the
candidate units for discovery and (where known) the ground-truth circuit. Loaders are
named as ``"module:function"`` strings and imported on demand, so ``names()`` is free and
an organism whose optional extra is missing fails only when loaded, with a clear error.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from torch import nn

__all__ = ["Organism", "card", "data_path", "load", "names"]

Batch = dict[str, torch.Tensor]

# name -> "module:function" returning an Organism. Kept in one table so `names()` needs
# no imports (and no optional extras).
_LOADERS: dict[str, str] = {
    "tracr-reverse": "meanablate.organisms.tracr_models:load_reverse",
    "tracr-frac_prevs": "meanablate.organisms.tracr_models:load_frac_prevs",
    "tracr-sort": "meanablate.organisms.tracr_models:load_sort",
    "tracr-hist": "meanablate.organisms.tracr_program:load_hist",
    "tracr-sort_unique": "meanablate.organisms.tracr_program:load_sort_unique",
    "induction": "meanablate.organisms.induction:load_induction",
    "minilm": "meanablate.organisms.minilm:load_minilm",
}


@dataclass
class Organism:
    """A model with a task and (where known) its true circuit.

    - ``model``: an ``nn.Module`` in eval mode; ``model(batch["tokens"])`` (plus
      ``attention_mask`` where the batch has one) gives logits ``[batch, pos, vocab]``.
    - ``make_batches(n_examples, batch_size, seed)``: a list of batches; each a dict with
      ``tokens`` ``[batch, pos]`` and the task's fields (``target``, ``target_pos``, ...).
    - ``metric``: the name of the metric in :mod:`meanablate.metrics` that fits the task.
    - ``units``: candidate units for discovery (site strings: heads, MLPs).
    - ``ground_truth``: the site strings of the true circuit, or ``None`` if unknown.
    - ``per_position_means``: whether its ground truth is defined under per-position
      means (fixed-length tasks whose positions play different roles).
    - ``card``: the JSON card (vocabulary, input length, task, ground truth, notes).
    """

    name: str
    model: nn.Module
    make_batches: Callable[[int, int, int], list[Batch]]
    metric: str
    units: list[str]
    ground_truth: list[str] | None
    card: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    per_position_means: bool = False


def names() -> list[str]:
    """Names of all built-in organisms (some need an optional extra to load)."""
    return sorted(_LOADERS)


def load(name: str) -> Organism:
    """Load the built-in organism ``name`` (see :func:`names`); offline, from the package."""
    if name not in _LOADERS:
        import difflib

        close = difflib.get_close_matches(name, names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown organism {name!r}; known: {', '.join(names())}{hint}")
    module, func = _LOADERS[name].split(":")
    loader = getattr(importlib.import_module(module), func)
    organism = loader()
    organism.model.eval()
    return organism


def data_path(filename: str) -> Any:
    """Path (a ``Traversable``) of a file shipped in ``meanablate/organisms/data``."""
    return resources.files("meanablate.organisms").joinpath("data", filename)


def card(filename: str) -> dict[str, Any]:
    """Read a JSON card shipped in ``meanablate/organisms/data``."""
    return json.loads(data_path(filename).read_text())
