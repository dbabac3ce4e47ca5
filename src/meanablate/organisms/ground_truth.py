"""Computed ground truth: the minimal circuits of an organism by brute force over subsets.

For each mean kind (:data:`~meanablate.stats.MEAN_KINDS`; ``plain_except`` keeps BOS,
position 0, on its own mean), means are taken over the organism's data set; then every
subset ``S`` of the units is kept with the rest mean-ablated (the plain hooked forward,
:func:`~meanablate.discovery.evaluate.metric_per_example`, one per subset) and scored by
``faithfulness(S) = (m(S) - m(empty)) / (m(full) - m(empty))``. The minimal circuits are
all subsets of the smallest size with ``faithfulness >= target``. Written into the card
under ``ground_truth_by_mean_kind``; ``ground_truth`` is the first minimal circuit (in
unit order) under the organism's own mean kind.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from meanablate.organisms.registry import Organism

__all__ = ["add_ground_truth", "minimal_circuits"]


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


def add_ground_truth(org: Organism, target: float, max_units: int) -> None:
    """Fill ``org.card``'s ground-truth fields (see the module docstring)."""
    from meanablate.organisms.tracr_program import DEFAULT_MEAN_KIND, exhaustive_batch
    from meanablate.stats import MEAN_KINDS, compute_means

    card = dict(org.card)
    units = list(org.units)
    card["mean_kind"] = DEFAULT_MEAN_KIND
    card["mean_ablation"] = {"mean": DEFAULT_MEAN_KIND}
    if len(units) > max_units:
        card["ground_truth"] = None
        card["ground_truth_definition"] = (
            f"not computed: {len(units)} units (2**{len(units)} subsets) exceed "
            f"max_brute_units={max_units}"
        )
        org.card = card
        return
    batch = exhaustive_batch(card)
    by_kind: dict[str, Any] = {}
    for kind in MEAN_KINDS:
        keep = [0] if kind == "plain_except" else None
        with torch.no_grad():
            means = compute_means(org.model, units, [batch], kind=kind, keep_positions=keep)
        result = minimal_circuits(org.model, batch, units, means, org.metric, target)
        result["mean_kind"] = kind
        if keep is not None:
            result["keep_positions"] = keep
        by_kind[kind] = result
    card["ground_truth_by_mean_kind"] = by_kind
    circuits = by_kind[DEFAULT_MEAN_KIND]["circuits"]
    card["ground_truth"] = circuits[0] if circuits else None
    card["ground_truth_definition"] = (
        "COMPUTED, not declared: for each mean kind (per_position; plain over all "
        "positions; plain_except: plain over positions 1.., BOS keeping its own mean), "
        f"every subset of the {len(units)} units was kept with the rest mean-ablated on the "
        f"whole data set ({len(batch['tokens'])} inputs), and the minimal circuits are all "
        f"subsets of the smallest size whose faithfulness on the card's metric "
        f"({org.metric}) reaches {target}. ground_truth is the first of them under "
        f"{DEFAULT_MEAN_KIND} means."
    )
    org.card = card
