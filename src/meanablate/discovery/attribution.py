"""Attribution: a linear estimate of every unit's ablation effect from one backward pass.

For a task metric the estimate is ``(fill - act) · dmetric/dact`` summed over the unit's
entries (attribution patching). A comparing metric (``kl``, ``l2``) has zero gradient at
the clean output, so a first-order estimate of it is always zero; we estimate it at
second order instead, with a random probe ``r`` in logit space whose covariance is the
metric's curvature (the Fisher ``diag(p) - p pᵀ`` for KL, the identity for L2):
``E[(rᵀ J Δa)²] = Δzᵀ F Δz ≈ 2·KL``. One probe per example and position costs one
backward pass; ``n_probes`` averages several.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from meanablate._unwrap import unwrap
from meanablate._validate import check_source
from meanablate.data.normalize import as_batches
from meanablate.discovery.scores import Scores
from meanablate.discovery.source import resample_batch
from meanablate.discovery.sweep import check_units
from meanablate.families import check_sites
from meanablate.hooks import capture, hooked, model_device, output_tensor, run_model, to_device
from meanablate.intervene import Method, _fill_for, unit_mask, view_shape
from meanablate.metrics import Metric, _seq, get_metric, scored_mask
from meanablate.sites import check_units_in_range
from meanablate.stats import Means
from meanablate.torch_threads import auto_threads

if TYPE_CHECKING:
    from meanablate.executors import Executor

__all__ = ["attribute"]


def _probe(logits: Tensor, kind: str, gen: torch.Generator) -> Tensor:
    # A random direction needs no float64: drawing and shaping it in the logits' own
    # dtype costs a third of a float64 one, which is a sizeable part of a KL attribution.
    dtype = logits.dtype if logits.dtype.is_floating_point else torch.float32
    z = torch.randn(logits.shape, generator=gen, dtype=dtype).to(logits.device)
    if kind == "l2":
        return z
    p = torch.softmax(logits.to(dtype), -1)
    sp = p.sqrt()
    return sp * z - p * (sp * z).sum(-1, keepdim=True)


@auto_threads
def attribute(
    model: nn.Module,
    batches: Iterable[Tensor | Mapping[str, Any]],
    units: Sequence[str],
    means: Means | None,
    *,
    metric: str | Metric = "loss",
    method: Method = "mean",
    n_probes: int = 1,
    seed: int = 0,
    executor: Executor | None = None,
) -> Scores:
    """Linear (task metrics) or probed second-order (``kl``, ``l2``) effect estimates.

    Returns :class:`Scores` like :func:`sweep`, ``values [n_units]`` and
    ``per_example [n_units, n_examples]``, with ``exact`` all ``False``. Cost: one
    forward and one backward pass per batch (per probe for comparing metrics).

    >>> import torch, meanablate as ma
    >>> from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
    >>> _ = torch.manual_seed(0)
    >>> model = HookedTransformer(TransformerConfig(n_layers=2, d_model=16, n_heads=2,
    ...     d_head=8, d_mlp=32, d_vocab=10, n_ctx=8)).eval()
    >>> tokens = torch.randint(0, 10, (6, 8))                     # [batch, pos]
    >>> units = ma.transformer_units(model)                       # 2 layers x (2 heads + MLP)
    >>> means = ma.compute_means(model, sorted({ma.parse_site(u).key for u in units}), tokens)
    >>> est = ma.attribute(model, tokens, units, means, metric="kl")
    >>> est.values.shape, bool(est.exact.any())                   # estimates, not exact
    (torch.Size([6]), False)
    """
    model = unwrap(model)
    m = get_metric(metric)
    batches = as_batches(batches)
    check_source(means, method, where="attribute")
    if executor is not None and not executor.in_process:
        return _attribute_distributed(
            executor, model, list(batches), units, means, m, method, n_probes, seed
        )
    if m.name == "accuracy":
        raise ValueError("accuracy has no gradient; attribute with 'loss' or 'logit_diff'")
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    units = check_units(model, units)
    sites = check_sites(model, units)
    keys = sorted({s.key for s in sites})
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    per_batch = []
    for raw in batches:
        batch = to_device(raw, device)
        probes = n_probes if m.compares or m.name == "mse" else 0
        contrib, npos = _one_pass(model, batch, sites, keys, means, m, method, gen, probes)
        if m.name == "kl":
            est = 0.5 * contrib / npos
        elif m.compares:  # l2: E|N(0, s^2)| = s * sqrt(2/pi)
            est = contrib * math.sqrt(math.pi / 2)
        else:
            est = contrib
        per_batch.append(est)
    if not per_batch:
        raise ValueError("attribute needs at least one batch")
    return Scores.from_examples(
        units, torch.cat(per_batch, dim=1), m.name, "attribution", time.perf_counter() - t0
    )


def _attribute_shard(
    model: nn.Module,
    item: tuple[int, list],
    *,
    units: Sequence[str],
    means: Any,
    metric: Metric,
    method: Method,
    n_probes: int,
    seed: int,
) -> Tensor:
    index, shard = item
    return attribute(
        model,
        shard,
        units,
        means,
        metric=metric,
        method=method,
        n_probes=n_probes,
        seed=seed + index,
    ).per_example


def _attribute_distributed(
    executor: Executor,
    model: nn.Module,
    batches: list,
    units: Sequence[str],
    means: Any,
    m: Metric,
    method: Method,
    n_probes: int,
    seed: int,
) -> Scores:
    """Data-parallel attribution: batch shards go to workers, examples stay in order.

    Task metrics give exactly the local result; the random probes of ``kl``/``l2`` are
    seeded per shard (``seed + shard``), so those estimates are deterministic but not
    bit-equal to a local run's.
    """
    if not batches:
        raise ValueError("attribute needs at least one batch")
    units = check_units(model, units)
    t0 = time.perf_counter()
    n = max(1, min(len(batches), executor.num_workers))
    size = -(-len(batches) // n)
    shards = [(i, batches[j : j + size]) for i, j in enumerate(range(0, len(batches), size))]
    fn = partial(
        _attribute_shard,
        units=units,
        means=means,
        metric=m,
        method=method,
        n_probes=n_probes,
        seed=seed,
    )
    rows = executor.map(fn, shards, model=model, desc="attribution shards")
    return Scores.from_examples(
        units, torch.cat(rows, dim=1), m.name, "attribution", time.perf_counter() - t0
    )


def _contribution(
    site: Any,
    act: Tensor,
    grad: Tensor,
    means: Any,
    method: Method,
    cache: dict[tuple[str, int | None, int], Tensor],
    source: Any = None,
) -> Tensor:
    """``sum over the unit's entries of (fill - act) * grad`` per example: ``[batch]``.

    The product over the whole activation is formed once per site key; single-axis
    selectors (neurons, heads or positions alone) then read a reduced copy of it, so
    attributing 512 neurons costs one pass over the activation, not 512.
    """
    check_units_in_range(site, tuple(act.shape))
    vshape = view_shape(site, tuple(act.shape))
    prod_key = (site.key, site.n_heads, -1)
    if prod_key not in cache:
        fill = _fill_for(site, act, means, method, source)  # type: ignore[arg-type]
        cache[prod_key] = (fill - act.reshape(vshape)).double() * grad.reshape(vshape).double()
    prod = cache[prod_key]
    axis = _single_axis(site, len(vshape))
    if axis is None:
        umask = unit_mask(site, tuple(act.shape), act.device)
        return torch.where(umask, prod, 0.0).flatten(1).sum(1)
    dim, chosen = axis
    red_key = (site.key, site.n_heads, dim)
    if red_key not in cache:
        others = [d for d in range(1, prod.ndim) if d != dim]
        cache[red_key] = prod.sum(dim=others) if others else prod
    return cache[red_key][:, list(chosen)].sum(1)


def _single_axis(site: Any, ndim: int) -> tuple[int, tuple[int, ...]] | None:
    chosen = [(ndim - 1, site.neurons), (ndim - 2, site.heads), (1, site.positions)]
    given = [(d, c) for d, c in chosen if c is not None]
    return given[0] if len(given) == 1 else None


def _site_rows(
    sites: list,
    acts: dict[str, Tensor],
    grad_of: dict[str, Tensor | None],
    means: Any,
    method: Method,
    source: Any = None,
) -> Tensor:
    """``[n_units, batch]``: each unit's ``(fill - act) · grad`` (``source``: the
    corrupted run's activations, for resample ablation)."""
    rows = []
    reduced: dict[tuple[str, int | None, int], Tensor] = {}
    for site in sites:
        act = acts[site.key]
        g = grad_of[site.key]
        if g is None:
            rows.append(torch.zeros(act.shape[0], dtype=torch.float64, device=act.device))
            continue
        rows.append(_contribution(site, act, g, means, method, reduced, source))
    return torch.stack(rows)


def _one_pass(
    model: nn.Module,
    batch: Any,
    sites: list,
    keys: list[str],
    means: Any,
    m: Metric,
    method: Method,
    gen: torch.Generator,
    n_probes: int,
) -> tuple[Tensor, Tensor]:
    """One forward and one backward per objective: the task metric's gradient, or (for
    comparing metrics and mse) ``n_probes`` random probes, averaged; ``[n_units, batch]``."""
    zs: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}

    def tap(key: str) -> Any:
        def fn(act: Tensor) -> Tensor:
            # Adding a zero leaf gives d(metric)/d(act) through every downstream path
            # without detaching the graph or touching the model's parameters.
            if key in acts:  # a second call would replace the first one's gradient leaf
                raise ValueError(
                    f"site {key} ran more than once in one forward pass (a module shared "
                    "between layers, or called per chunk); attribute needs one activation "
                    "per forward: use a site that runs once (e.g. a module inside one layer)"
                )
            acts[key] = act.detach()
            zs[key] = torch.zeros_like(act, requires_grad=True)
            return act + zs[key]

        return fn

    with torch.enable_grad(), hooked(model, {k: tap(k) for k in keys}):
        out = output_tensor(run_model(model, batch))
        mask = scored_mask(batch, out)
        npos = mask.sum(1).double().clamp_min(1)
        objectives = []
        if m.compares:
            lg = _seq(out)
            for _ in range(n_probes):
                r = torch.where(
                    mask[..., None], _probe(out.detach(), m.name, gen).reshape(lg.shape), 0.0
                )
                objectives.append(torch.linalg.vecdot(r, lg).double().sum())
        else:
            objectives.append(m(out, batch, out.detach()).sum())
        if m.name == "mse":
            # At a perfect fit the error, and so the linear term, is zero: add the
            # second-order term sum_p d_p^2 through Rademacher probes on the prediction.
            pred = _seq(out)[..., 0].double()
            for _ in range(n_probes):
                sign = torch.randint(0, 2, pred.shape, generator=gen).to(pred.device) * 2.0 - 1
                objectives.append((torch.where(mask, sign, 0.0) * pred).sum())
        inputs = [zs[k] for k in keys]
        # One forward serves every probe: each further probe costs a backward only.
        grads = [
            torch.autograd.grad(
                obj, inputs, allow_unused=True, retain_graph=i + 1 < len(objectives)
            )
            for i, obj in enumerate(objectives)
        ]
    source = None
    other = resample_batch(batch, method)
    if other is not None:
        with torch.no_grad(), capture(model, keys, once=True) as store:
            run_model(model, other)
        source = dict(store)
    parts = [_site_rows(sites, acts, dict(zip(keys, g)), means, method, source) for g in grads]
    if m.name == "mse":
        return parts[0] + sum(p.pow(2) for p in parts[1:]) / len(parts[1:]) / npos, npos
    if m.name == "kl":
        return sum(p.pow(2) for p in parts) / len(parts), npos
    if m.compares:
        return sum(p.abs() for p in parts) / len(parts), npos
    return parts[0], npos
