"""The tracr organisms ``reverse``, ``frac_prevs``, ``sort`` (and the task-definition
targets that check them).

tracr (Lindner et al. 2023) compiles a RASP program into transformer weights, so the
mechanism is known by construction. All shipped tracr organisms (these three,
``tracr-hist``, ``tracr-sort_unique``) are built by
:func:`~meanablate.organisms.from_tracr` (``scripts/compile_tracr.py``) and shipped as
``data/tracr_<task>.safetensors`` plus the card ``data/tracr_<task>.json`` (vocabulary,
input length, data set with every input and tracr's targets, metric, output classes,
ground truth computed per mean kind); loading reads them with
:func:`~meanablate.organisms.tracr_program.load_shipped`, without tracr.

Batches (shared by all organisms)
---------------------------------
Every input is ``BOS`` followed by ``n_input_tokens`` vocabulary tokens (fixed length;
BOS is position 0 and never scored). A batch is a dict with ``tokens`` ``[batch, pos]``
and, for categorical tasks, ``target`` ``[batch, pos]`` (output-class id, ``-100`` where
unscored) or, for numerical tasks, ``target_value`` ``[batch, pos]`` (NaN where unscored).

:func:`make_targets` computes the targets from the task's definition (reverse, sort,
running fraction), independently of tracr: the tests check the card's targets with it.

>>> org = load_reverse()
>>> batch = org.make_batches(4, 4, 0)[0]
>>> score(org.card, org.model(batch["tokens"]), batch)["accuracy"]
1.0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from meanablate.organisms import registry
from meanablate.organisms.registry import Batch, Organism

__all__ = [
    "TASKS",
    "exhaustive_batches",
    "load_frac_prevs",
    "load_reverse",
    "load_sort",
    "load_task",
    "make_batches",
    "make_targets",
    "score",
]

TASKS = ("reverse", "frac_prevs", "sort")
IGNORE_INDEX = -100


def load_reverse() -> Organism:
    """tracr ``lib.make_reverse(tokens)``: output the input sequence reversed."""
    return load_task("reverse")


def load_frac_prevs() -> Organism:
    """tracr ``lib.make_frac_prevs(tokens == "x")``: running fraction of ``x`` tokens."""
    return load_task("frac_prevs")


def load_sort() -> Organism:
    """tracr ``lib.make_sort(tokens, tokens)``: output the input sorted (stable)."""
    return load_task("sort")


def load_task(task: str) -> Organism:
    """Load the tracr organism for ``task`` (one of :data:`TASKS`) from the package data."""
    from meanablate.organisms.tracr_program import load_shipped

    if task not in TASKS:
        raise ValueError(f"unknown tracr task {task!r}; known: {', '.join(TASKS)}")
    return load_shipped(f"tracr_{task}")


# -- data ---------------------------------------------------------------------------
def make_targets(card: Mapping[str, Any], tokens: Tensor) -> Batch:
    """The batch for ``tokens [batch, pos]`` (BOS first): tokens plus the task's targets."""
    task = card["task"]
    vocab = card["vocabulary"]
    body = tokens[:, 1:]
    n, length = body.shape
    if task == "frac_prevs":
        hits = (body == vocab["ids"][card["task_spec"]["count_token"]]).double()
        frac = hits.cumsum(1) / torch.arange(1, length + 1, dtype=torch.float64)
        value = torch.full((n, length + 1), float("nan"), dtype=torch.float32)
        value[:, 1:] = frac.float()
        return {"tokens": tokens, "target_value": value}
    # token id -> output-class id (classes are the output values, ascending for sort)
    lut = torch.full((vocab["size"],), IGNORE_INDEX, dtype=torch.long)
    for cls, value in enumerate(card["output"]["classes"]):
        lut[vocab["ids"][value]] = cls
    classes = lut[body]
    if task == "reverse":
        out = classes.flip(1)
    elif task == "sort":
        out = classes.sort(dim=1, stable=True).values
    else:
        raise ValueError(f"unknown tracr task {task!r}")
    target = torch.full((n, length + 1), IGNORE_INDEX, dtype=torch.long)
    target[:, 1:] = out
    return {"tokens": tokens, "target": target}


def make_batches(
    card: Mapping[str, Any], n_examples: int, batch_size: int, seed: int = 0
) -> list[Batch]:
    """``n_examples`` inputs drawn uniformly (with replacement, ``torch.Generator(seed)``):
    :func:`meanablate.organisms.tracr_program.make_batches`."""
    from meanablate.organisms import tracr_program

    return tracr_program.make_batches(card, n_examples, batch_size, seed)


def exhaustive_batches(card: Mapping[str, Any] | str, batch_size: int = 4096) -> list[Batch]:
    """Every input of the card's data set (for ``reverse``, ``frac_prevs``, ``sort``: all
    ``len(vocab) ** n_input_tokens`` sequences, in ``itertools.product`` order), with
    tracr's targets, in batches of ``batch_size``. ``card``: a card, or a task name."""
    from meanablate.organisms import tracr_program

    if isinstance(card, str):
        card = registry.card(f"tracr_{card}.json")
    full = tracr_program.exhaustive_batch(card)
    n = len(full["tokens"])
    return [{k: v[i : i + batch_size] for k, v in full.items()} for i in range(0, n, batch_size)]


# -- metrics ------------------------------------------------------------------------
def score(card: Mapping[str, Any], logits: Tensor, batch: Batch) -> dict[str, float]:
    """Task accuracy and the card's metric (``loss`` or ``mse``) over scored positions.

    Categorical: ``accuracy`` = argmax equals ``target``; ``loss`` = mean cross-entropy.
    Numerical: ``accuracy`` = ``|prediction - target_value| < card["accuracy_tolerance"]``;
    ``mse`` = mean squared error. The prediction is ``logits[..., 0]``.
    """
    logits = logits.detach().double()
    if "target" in batch:
        target = batch["target"]
        keep = target != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(logits[keep], target[keep])
        acc = (logits[keep].argmax(-1) == target[keep]).double().mean()
        return {"accuracy": float(acc), "loss": float(loss)}
    target = batch["target_value"].double()
    keep = ~target.isnan()
    err = logits[..., 0][keep] - target[keep]
    acc = (err.abs() < card["accuracy_tolerance"]).double().mean()
    return {"accuracy": float(acc), "mse": float(err.pow(2).mean())}
