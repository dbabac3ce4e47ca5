"""A built-in organism (``--organism NAME``): its model, data, metric, units and ground truth."""

from __future__ import annotations

from typing import Any

from meanablate.cli.errors import one_line
from meanablate.cli.records import Inputs
from meanablate.config import (
    BIG_MODEL,
    DEFAULT_N_EXAMPLES,
    DEFAULT_N_EXAMPLES_BIG,
    InputError,
    Resolved,
)

__all__ = ["load_organism"]


def load_organism(cfg: Resolved, name: str) -> Inputs:
    from meanablate import organisms

    known = organisms.names()
    if name.endswith(".json") and name not in known:  # written by `meanablate tracr`
        return _from_card(cfg, name)
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(
            f"{cfg.sources['organism']}: unknown organism {name!r}{hint}; known: {', '.join(known)}"
        )
    try:
        org = organisms.load(name)
    except Exception as exc:
        raise InputError(
            f"cannot load organism {name!r}: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    return _inputs(cfg, name, org)


def _from_card(cfg: Resolved, path: str) -> Inputs:
    from pathlib import Path

    from meanablate.organisms import tracr_program

    if not Path(path).is_file():
        raise InputError(f"{cfg.sources['organism']}: no such organism card {path}")
    try:
        org = tracr_program.load(path)
    except Exception as exc:
        raise InputError(
            f"cannot load organism {path}: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    return _inputs(cfg, org.name, org)


def _inputs(cfg: Resolved, name: str, org: Any) -> Inputs:
    n = cfg["n_examples"]
    if n is None:
        big = sum(p.numel() for p in org.model.parameters()) > BIG_MODEL
        n = DEFAULT_N_EXAMPLES_BIG if big else DEFAULT_N_EXAMPLES
    batches = org.make_batches(n, cfg["batch_size"], cfg["seed"])
    ground_truth = org.ground_truth
    by_kind = org.card.get("ground_truth_by_mean_kind") if org.card else None
    kind = cfg.values.get("mean_kind")
    if kind is None and cfg.values.get("per_position") is False:
        kind = "plain"  # --no-per-position means plain means: score against its truth
    if by_kind and kind in by_kind:  # computed per mean kind (from_tracr organisms)
        circuits = by_kind[kind].get("circuits")
        ground_truth = circuits[0] if circuits else None
    if cfg["method"] == "resample":
        # Counterfactual inputs: fresh draws of the same task, aligned (fixed length).
        other = org.make_batches(n, cfg["batch_size"], cfg["seed"] + 1)
        batches = [{**b, "corrupt": o["tokens"]} for b, o in zip(batches, other)]
    return Inputs(
        name=name,
        model=org.model,
        batches=list(batches),
        units=list(org.units),
        metric=org.metric,
        ground_truth=list(ground_truth) if ground_truth else None,
        per_position=bool(org.per_position_means),
        source="organism",
        description=org.description,
    )
