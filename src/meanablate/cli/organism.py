"""A built-in organism (``--organism NAME``): its model, data, metric, units and ground truth."""

from __future__ import annotations

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
    n = cfg["n_examples"]
    if n is None:
        big = sum(p.numel() for p in org.model.parameters()) > BIG_MODEL
        n = DEFAULT_N_EXAMPLES_BIG if big else DEFAULT_N_EXAMPLES
    batches = org.make_batches(n, cfg["batch_size"], cfg["seed"])
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
        ground_truth=list(org.ground_truth) if org.ground_truth else None,
        per_position=bool(org.per_position_means),
        source="organism",
        description=org.description,
    )
