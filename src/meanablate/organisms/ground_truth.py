"""Computed ground truth: the minimal circuits of an organism by brute force over subsets.

For each mean kind (:data:`~meanablate.stats.MEAN_KINDS`; ``plain_except`` keeps BOS,
position 0, on its own mean), means are taken over the organism's data set; then every
subset ``S`` of the units is kept with the rest mean-ablated (the plain hooked forward,
:func:`~meanablate.discovery.evaluate.metric_per_example`, one per subset) and scored by
``faithfulness(S) = (m(S) - m(empty)) / (m(full) - m(empty))``. The minimal circuits are
all subsets of the smallest size with ``faithfulness >= target``. Written into the card
under ``ground_truth_by_mean_kind``; ``ground_truth`` is the first minimal circuit (in
unit order) under the organism's own mean kind (``per_position`` for every shipped tracr
organism: ``card["mean_kind"]``), and is what ``Organism.ground_truth`` (AUROC) holds.

Used by :func:`~meanablate.organisms.from_tracr`, which builds every shipped tracr
organism (``scripts/compile_tracr.py``). The metric is the organism's own
(``org.metric``), so the ground truth is computed for the metric discovery will use.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from meanablate.organisms.registry import Organism

__all__ = ["add_ground_truth", "by_mean_kind", "definition", "minimal_circuits"]


def minimal_circuits(
    model: Any,
    batch: Any,
    units: list[str],
    means: Any,
    metric: str,
    target: float,
) -> dict[str, Any]:
    """``{"circuits", "size", "faithfulness", "metric_full", "metric_empty", ...}``: every
    smallest subset of ``units`` whose faithfulness reaches ``target``."""
    from meanablate.discovery.evaluate import metric_per_example

    cache: dict[frozenset[str], float] = {}

    def m(kept: tuple[str, ...]) -> float:
        key = frozenset(kept)
        if key not in cache:
            ablated = [u for u in units if u not in key]
            cache[key] = float(metric_per_example(model, [batch], ablated, means, metric).mean())
        return cache[key]

    full, empty = m(tuple(units)), m(())
    out: dict[str, Any] = {"metric_full": full, "metric_empty": empty, "target": target}
    if abs(full - empty) < 1e-12:
        out.update(circuits=None, size=None, note="m(full) = m(empty): nothing to explain")
        return out
    for size in range(len(units) + 1):
        hits = []
        for kept in itertools.combinations(units, size):
            f = (m(kept) - empty) / (full - empty)
            if f >= target - 1e-9:
                hits.append((list(kept), f))
        if hits:
            out.update(
                circuits=[k for k, _ in hits],
                faithfulness=[f for _, f in hits],
                size=size,
                subsets_checked=len(cache),
            )
            return out
    raise AssertionError("the full set always reaches a target <= 1")  # pragma: no cover


def by_mean_kind(
    model: Any, batch: Any, units: list[str], metric: str, target: float
) -> dict[str, dict[str, Any]]:
    """``{mean kind: minimal_circuits(...)}`` for every kind in
    :data:`~meanablate.stats.MEAN_KINDS`, means taken over ``batch`` (``plain_except``
    keeps position 0, BOS, on its own mean; recorded as ``keep_positions``)."""
    from meanablate.stats import MEAN_KINDS, compute_means

    out: dict[str, dict[str, Any]] = {}
    for kind in MEAN_KINDS:
        keep = [0] if kind == "plain_except" else None
        with torch.no_grad():
            means = compute_means(model, units, [batch], kind=kind, keep_positions=keep)
        result = minimal_circuits(model, batch, units, means, metric, target)
        result["mean_kind"] = kind
        if keep is not None:
            result["keep_positions"] = keep
        out[kind] = result
    return out


def definition(n_units: int, n_inputs: int, metric: str, target: float) -> str:
    """The card's ``ground_truth_definition`` for a computed ground truth."""
    from meanablate.organisms.tracr_program import DEFAULT_MEAN_KIND

    return (
        "COMPUTED, not declared: for each mean kind (per_position; plain over all "
        "positions; plain_except: plain over positions 1.., BOS keeping its own mean), "
        f"every subset of the {n_units} units was kept with the rest mean-ablated on the "
        f"whole data set ({n_inputs} inputs), and the minimal circuits are all "
        f"subsets of the smallest size whose faithfulness on the card's metric "
        f"({metric}) reaches {target}. ground_truth is the first of them under "
        f"{DEFAULT_MEAN_KIND} means."
    )


def add_ground_truth(org: Organism, target: float, max_units: int, batch: Any = None) -> None:
    """Fill ``org.card``'s ground-truth fields (see the module docstring) and
    ``org.ground_truth``. ``batch``: the whole data set as one batch (default: the card's
    ``examples``, :func:`~meanablate.organisms.tracr_program.exhaustive_batch`)."""
    from meanablate.organisms.tracr_program import DEFAULT_MEAN_KIND, exhaustive_batch

    card = dict(org.card)
    units = list(org.units)
    card["mean_kind"] = DEFAULT_MEAN_KIND
    card["mean_ablation"] = {**card.get("mean_ablation", {}), "mean": DEFAULT_MEAN_KIND}
    if len(units) > max_units:
        card["ground_truth"] = None
        card["ground_truth_definition"] = (
            f"not computed: {len(units)} units (2**{len(units)} subsets) exceed "
            f"max_brute_units={max_units}"
        )
        org.card = card
        org.ground_truth = None
        return
    if batch is None:
        batch = exhaustive_batch(card)
    by_kind = by_mean_kind(org.model, batch, units, org.metric, target)
    card["ground_truth_by_mean_kind"] = by_kind
    circuits = by_kind[DEFAULT_MEAN_KIND]["circuits"]
    card["ground_truth"] = circuits[0] if circuits else None
    card["ground_truth_definition"] = definition(
        len(units), len(batch["tokens"]), org.metric, target
    )
    org.card = card
    org.ground_truth = list(circuits[0]) if circuits else None
