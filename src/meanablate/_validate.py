"""Checks that every model-level entry point runs before doing work (docs/errors.md).

:func:`check_source`: the ablation method and what it needs (means for ``"mean"``);
:func:`check_units_fit`: every unit's selector fits the activation it indexes — one
forward on one example, so a head or neuron out of range is an error naming the site
instead of torch's ``index 7 is out of bounds for dimension 0 with size 2`` deep inside
a fast path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["METHODS", "activation_shapes", "check_batch", "check_source", "check_units_fit"]

METHODS = ("mean", "zero", "resample")


def check_source(means: Any, method: Any, *, where: str) -> None:
    """``ValueError``/``TypeError`` unless ``method`` is known and has what it needs."""
    from meanablate.stats import Means

    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{where}: method must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "mean":
        if means is None:
            raise ValueError(
                f"{where}: method='mean' needs means (got means=None); compute them with "
                "compute_means(model, sites, batches), or pass method='zero'"
            )
        if not isinstance(means, Means):
            raise TypeError(
                f"{where}: means must be a meanablate.Means (from compute_means or "
                f"Means.load), got {type(means).__name__}"
            )


def check_batch(batch: Any, where: str) -> None:
    """``TypeError`` unless ``batch`` is a tensor or a mapping of names to values."""
    if not isinstance(batch, (Tensor, Mapping)):
        raise TypeError(
            f"{where}: a batch is a tensor [batch, pos] or a dict of tensors "
            f"(input_ids/tokens, attention_mask, ...), got {type(batch).__name__}"
        )


def _first_example(batch: Tensor | Mapping[str, Any]) -> Tensor | dict[str, Any]:
    if isinstance(batch, Tensor):
        return batch[:1]
    n = next((int(v.shape[0]) for v in batch.values() if isinstance(v, Tensor) and v.ndim), None)
    return {
        k: (v[:1] if isinstance(v, Tensor) and v.ndim and int(v.shape[0]) == n else v)
        for k, v in batch.items()
    }


def activation_shapes(model: nn.Module, keys: Sequence[str], batch: Any) -> dict[str, tuple]:
    """The shape of each site key's activation on the first example of ``batch``.

    Keys whose module does not run in the forward pass are absent.
    """
    from meanablate.hooks import capture, model_device, run_model, to_device

    probe = to_device(_first_example(batch), model_device(model))
    with torch.inference_mode(), capture(model, sorted(set(keys))) as store:
        run_model(model, probe)
    return {k: tuple(v.shape) for k, v in store.items()}


def check_units_fit(model: nn.Module, units: Sequence[Any], batch: Any, means: Any = None) -> None:
    """``IndexError``/``ValueError`` naming the site if a selector does not fit its activation.

    With ``means`` (a :class:`~meanablate.stats.Means` holding every unit's site), each
    unit's neurons and heads are checked against its mean's shape — the activation's
    without batch (and position) — at no cost; positions are checked where the hooks run.
    Otherwise ``model`` runs once on the first example of ``batch`` and every selector is
    checked against the real activation. A module that never runs is an error (ablating
    it would change nothing).
    """
    from meanablate.families import check_sites
    from meanablate.sites import check_units_in_range

    sites = check_sites(model, units)  # the family's layout: n_heads of flat head sites
    if means is not None and all(s.key in means for s in sites):
        for site in sites:
            mean = means[site.key]
            trailing = tuple(mean.shape[1:] if means.per_position else mean.shape)
            if site.positions is not None or not trailing:
                continue
            if site.heads is not None and site.n_heads is None and len(trailing) < 2:
                continue  # no head axis in the mean: the family's check speaks for heads
            check_units_in_range(site, (1, 1, *trailing))  # [batch, pos, ...] as hooks see it
        return
    shapes = activation_shapes(model, [s.key for s in sites], batch)
    for site in sites:
        if site.key not in shapes:
            # its ablation would change nothing: an effect of exactly 0, silently
            raise ValueError(
                f"site {site}: its module never ran in the forward pass on the batch's first "
                "example (e.g. nn.MultiheadAttention's out_proj, whose weight the fused "
                "attention reads directly); ablate a module that runs"
            )
        check_units_in_range(site, shapes[site.key])
