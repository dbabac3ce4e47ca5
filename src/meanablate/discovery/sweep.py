"""Exact sweep: the mean-ablation effect of every unit, each ablated alone."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from meanablate._unwrap import unwrap
from meanablate._validate import check_batch, check_source, check_units_fit
from meanablate.data.normalize import as_batches
from meanablate.discovery import fastpath, layerskip
from meanablate.discovery.scores import Scores
from meanablate.discovery.source import check_corrupt, resample_batch
from meanablate.families import check_sites, family_of
from meanablate.hooks import capture, model_device, output_tensor, run_model, to_device
from meanablate.intervene import CapturedSource, Method, _fill_for, ablate
from meanablate.metrics import Metric, check_shapes, get_metric, scored_mask
from meanablate.organisms.transformer import HookedTransformer
from meanablate.sites import as_sites, resolve_module
from meanablate.stats import Means
from meanablate.torch_threads import auto_threads

if TYPE_CHECKING:
    from meanablate.executors import Executor

__all__ = ["check_units", "restrict_positions", "sweep"]

Stack = int | Literal["auto"]


def check_units(model: nn.Module, units: Sequence[str]) -> list[str]:
    """Normalize unit strings, checking each names a module of ``model`` and fits its
    family (head counts, head axes: :func:`meanablate.families.check_sites`)."""
    model = unwrap(model)
    if isinstance(units, str) or not len(units):
        raise ValueError("units must be a non-empty list of sites")
    out = []
    seen: set[str] = set()
    sites = as_sites(units)
    for site in sites:
        if site.module not in seen:  # resolving walks every module: once per path
            resolve_module(model, site.module)
            seen.add(site.module)
        out.append(str(site))
    checked = check_sites(model, sites)
    if len({str(s) for s in checked}) != len(out):
        raise ValueError("units contain duplicates")
    return out


def restrict_positions(batch: Mapping[str, Any], logits: Tensor) -> tuple[Tensor | None, dict]:
    """Positions the metric reads (``None``: all) and the batch's ``[b, p]`` fields cut to them.

    The fields are checked against ``logits`` first (:func:`~meanablate.metrics.check_shapes`):
    a field of another shape is an error, not a field left uncut.
    """
    check_shapes(logits, batch, None, "sweep")
    if logits.ndim != 3:
        return None, dict(batch)
    mask = scored_mask(batch, logits)
    keep = torch.nonzero(mask.any(0)).reshape(-1)
    if keep.numel() == logits.shape[1]:
        return None, dict(batch)
    b, p = logits.shape[:2]
    sub = {
        k: (v[:, keep] if isinstance(v, Tensor) and tuple(v.shape[:2]) == (b, p) else v)
        for k, v in batch.items()
    }
    return keep, sub


def _choose_stack(stack: Stack, device: torch.device) -> int:
    if stack != "auto":
        if not isinstance(stack, int) or stack < 1:
            raise ValueError(f"stack must be a positive int or 'auto', got {stack!r}")
        return stack
    # On a CPU the arithmetic is the limit and stacking copies only costs memory traffic
    # (measured: 8 stacked copies made a sweep 1.4x slower); on a GPU, small batches
    # leave the device idle, so stack until the calibration stops improving.
    return 1 if device.type == "cpu" else 0  # 0: calibrate on the first group


def _calibrate(run: Any, n: int) -> int:
    best_k, best_t = 1, float("inf")
    k = 1
    while k <= min(n, 256):
        try:
            run(k)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(k)
            torch.cuda.synchronize()
            per_unit = (time.perf_counter() - t0) / k
        except torch.OutOfMemoryError:
            break
        if per_unit > best_t * 0.95:
            break
        best_k, best_t = k, per_unit
        k *= 2
    return best_k


@auto_threads
def sweep(
    model: nn.Module,
    batches: Iterable[Tensor | Mapping[str, Any]],
    units: Sequence[str],
    means: Means | None,
    *,
    metric: str | Metric = "kl",
    method: Method = "mean",
    stack: Stack = "auto",
    fast: bool = True,
    progress: bool = False,
    executor: Executor | None = None,
) -> Scores:
    """The effect of ablating each unit alone, on every example: exact, batched.

    ``units``: site strings (see :func:`transformer_units`). Returns :class:`Scores`
    with ``values [n_units]`` and ``per_example [n_units, n_examples]``; effects are as
    in :func:`ablation_effect` (distance for ``kl``/``l2``, change for task metrics).

    On our :class:`HookedTransformer` (``fast=True``) the clean run is cached and only
    the layers from the unit's on re-run (:mod:`~meanablate.discovery.fastpath`). For
    discrete metrics (``Metric.discrete``, e.g. accuracy) they re-run as the hooked
    forward runs them, so the result is the hooked forward's exactly, ties included.
    For continuous ones the stream resumes from ``resid + (fill - act) @ W``, the last
    layer runs only where the metric reads, and ``stack`` ablations share one forward
    (``"auto"``: 1 on CPU, calibrated on GPU): the same numbers up to float rounding.
    On Hugging Face families the hooked forward resumes from the unit's block; for
    continuous metrics, heads finish their block from the re-projected ablated input
    (no attention re-run), BERT neurons re-run only ``output.dense`` and the layer norm,
    and GPT-2/Llama/NeoX neurons start the next block from ``resid + (fill - act) @ W``
    (:mod:`~meanablate.discovery.layerskip`); a continuous metric that reads some
    positions only (the last token, a ``metric_mask``, masked-LM targets) gets the last
    block's queries, MLP half and the tail there only (``Family.block_at``). Other models
    and sites run one hooked forward per unit.

    ``method="resample"`` (each batch carries ``corrupt``, see
    :func:`~meanablate.discovery.source.check_corrupt`): with ``fast=True`` the corrupted
    input runs once per batch, capturing every unit's activation, and each unit then takes
    the routes above with its per-example fill ``[batch, pos, ...]`` (what
    ``ablate(model, unit, method="resample", source=corrupted)`` patches in).

    ``executor``: where to run (default: here). A ``RayExecutor`` splits the units into
    chunks, one model replica per worker, and concatenates the rows in unit order; the
    result equals the local run.

    >>> import torch, meanablate as ma
    >>> from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
    >>> _ = torch.manual_seed(0)
    >>> model = HookedTransformer(TransformerConfig(n_layers=2, d_model=16, n_heads=2,
    ...     d_head=8, d_mlp=32, d_vocab=10, n_ctx=8)).eval()
    >>> tokens = torch.randint(0, 10, (6, 8))                     # [batch, pos]
    >>> units = ma.transformer_units(model)                       # 2 layers x (2 heads + MLP)
    >>> means = ma.compute_means(model, sorted({ma.parse_site(u).key for u in units}), tokens)
    >>> scores = ma.sweep(model, tokens, units, means, metric="kl")
    >>> scores.values.shape, scores.per_example.shape             # [units], [units, examples]
    (torch.Size([6]), torch.Size([6, 6]))
    >>> bool(scores.exact.all())
    True
    """
    model = unwrap(model)
    m = get_metric(metric)
    check_source(means, method, where="sweep")
    units = check_units(model, units)
    batches = list(as_batches(batches))
    if not batches:
        raise ValueError("sweep needs at least one batch")
    for i, b in enumerate(batches):
        check_batch(b, f"sweep: batches[{i}]")
        if method == "resample":  # misaligned counterfactuals fail before any work
            check_corrupt(b)
    check_units_fit(model, units, batches[0], means if method == "mean" else None)
    if executor is not None and not executor.in_process:
        return _sweep_distributed(
            executor, model, batches, units, means, m, method, stack, fast, progress
        )
    device = model_device(model)
    is_fast_model = fast and fastpath.supports(model)
    plans = {u: fastpath.plan_unit(model, u) if is_fast_model else None for u in units}
    k_stack = _choose_stack(stack, device)
    per_batch: list[Tensor] = []
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units) * len(batches), desc="sweep", unit="unit")
    try:
        with torch.inference_mode():
            for raw in batches:
                batch = to_device(raw, device)
                effects = _sweep_batch(
                    model, batch, units, plans, means, m, method, k_stack, bar, skip_layers=fast
                )
                per_batch.append(torch.stack([effects[u] for u in units]))
    finally:
        if bar is not None:
            bar.close()
    return Scores.from_examples(
        units, torch.cat(per_batch, dim=1), m.name, "sweep", time.perf_counter() - t0
    )


def _sweep_chunk(
    model: nn.Module,
    chunk: list[str],
    *,
    batches: list,
    means: Any,
    metric: Metric,
    method: Method,
    stack: Stack,
    fast: bool,
) -> Tensor:
    """One worker's share of a distributed sweep: ``per_example [len(chunk), examples]``."""
    return sweep(
        model, batches, chunk, means, metric=metric, method=method, stack=stack, fast=fast
    ).per_example


def _sweep_distributed(
    executor: Executor,
    model: nn.Module,
    batches: list,
    units: list[str],
    means: Any,
    m: Metric,
    method: Method,
    stack: Stack,
    fast: bool,
    progress: bool,
) -> Scores:
    t0 = time.perf_counter()
    n_chunks = max(1, min(len(units), 4 * max(1, executor.num_workers)))
    size = -(-len(units) // n_chunks)
    chunks = [units[i : i + size] for i in range(0, len(units), size)]
    fn = partial(
        _sweep_chunk, batches=batches, means=means, metric=m, method=method, stack=stack, fast=fast
    )
    rows = executor.map(fn, chunks, model=model, progress=progress, desc="sweep chunks")
    return Scores.from_examples(
        units, torch.cat(rows, dim=0), m.name, "sweep", time.perf_counter() - t0
    )


def _hooked_effects(
    model: nn.Module,
    batch: Any,
    units: list[str],
    means: Any,
    m: Metric,
    method: Method,
    bar: Any,
    skip_layers: bool,
    source_acts: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """One hooked forward per unit; on a family that can resume, from the unit's block.

    ``source_acts``: resample fills captured once from the corrupted run (by site key);
    ``None`` with ``method="resample"``: each unit's ``ablate()`` runs the corrupted input.

    The clean run records how each block is called; a unit in block ``L`` then runs
    blocks ``L..`` and the tail only (:mod:`~meanablate.discovery.layerskip`). Other
    models, units outside the blocks, and models carrying hooks of their own (which a
    resumed run would skip) take the full forward.
    """
    family = family_of(model)
    skip = skip_layers and not fastpath.any_hooks(model)
    # Continuous metrics may take a unit's linear write (neurons, heads) into the stream
    # it enters; discrete ones rerun the unit's block through its hook, as the hooked
    # forward does.
    linear = skip and not m.discrete and (method != "resample" or source_acts is not None)
    sites = {u: check_sites(model, u)[0] for u in units}
    with layerskip.record_block_calls(family) if skip else nullcontext() as calls:
        writes = {}
        if calls is not None and linear:
            writes = {u: layerskip.linear_site(family, s) for u, s in sites.items()}
            writes = {u: w for u, w in writes.items() if w is not None}
        streams = {u: family.stream_key(w) for u, w in writes.items()}
        keys = sorted({sites[u].key for u in writes} | {k for k in streams.values() if k})
        with capture(model, keys, once=True) as acts:
            clean = output_tensor(run_model(model, batch))
    if calls is not None:
        writes = {
            u: w for u, w in writes.items() if calls.resumable_from(layerskip.resume_layer(w))
        }
    # Continuous metrics on a resumed run: the last block and the tail only at the
    # positions the metric reads (float rounding apart, the same numbers); a discrete
    # metric takes the hooked forward's own steps on the whole batch.
    positions, sub = None, batch
    if calls is not None and not m.discrete and isinstance(batch, Mapping):
        positions, sub = restrict_positions(batch, clean)
    effect_of = m.bind(sub, clean if positions is None else clean[:, positions])
    n_blocks = len(calls.calls) if calls is not None else 0
    prefix = family.blocks()[0] if calls is not None else ""  # type: ignore[index]
    effects: dict[str, Tensor] = {}
    for u in units:
        if u in writes:
            site, act = sites[u], acts[sites[u].key]
            fill = _fill_for(site, act, means, method, source_acts)
            stream = acts[streams[u]] if streams[u] else None
            out = layerskip.run_linear(
                family,
                calls,  # type: ignore[arg-type]
                site,
                writes[u],
                act,
                fill,
                stream,
                positions,
            )
            effects[u] = effect_of(out)
            if bar is not None:
                bar.update(1)
            continue
        layer = None
        if calls is not None:
            layer = layerskip.block_of(sites[u].module, prefix, n_blocks)
            if layer is not None and not calls.resumable_from(layer):
                layer = None
        if method != "resample":
            source = None
        elif source_acts is not None:
            source = CapturedSource(source_acts)
        else:
            source = resample_batch(batch, method)
        with ablate(model, u, means, method=method, source=source):
            if layer is None:
                out = output_tensor(run_model(model, batch))
                out = out if positions is None else out[:, positions]
            else:
                out = layerskip.run_from(family, calls, layer, positions=positions)  # type: ignore[arg-type]
        effects[u] = effect_of(out)
        if bar is not None:
            bar.update(1)
    return effects


def _sweep_batch(
    model: nn.Module,
    batch: Any,
    units: list[str],
    plans: dict,
    means: Any,
    m: Metric,
    method: Method,
    k_stack: int,
    bar: Any,
    skip_layers: bool = False,
) -> dict[str, Tensor]:
    effects: dict[str, Tensor] = {}
    hooked_model = fastpath.any_hooks(model)  # the fast path would bypass foreign hooks
    slow = [u for u in units if plans[u] is None or hooked_model]
    fast_units = [u for u in units if plans[u] is not None and not hooked_model]
    src = None
    if method == "resample" and skip_layers:  # once per batch, for every unit
        src = corrupt_acts(model, batch, sorted({check_sites(model, u)[0].key for u in units}))
    if slow:
        effects.update(_hooked_effects(model, batch, slow, means, m, method, bar, skip_layers, src))
    if not fast_units:
        return effects
    assert isinstance(model, HookedTransformer)
    tokens, amask = fastpath.tokens_and_mask(batch)
    bdict = batch if isinstance(batch, Mapping) else {"tokens": batch}
    keys = sorted({plans[u].site.key for u in fast_units})
    state = fastpath.clean_state(model, tokens, amask, keys)
    exact = m.discrete  # a tie is decided by the last bit: only the forward's own steps
    positions, sub = restrict_positions(bdict, state.logits)
    if exact:
        positions, sub = None, bdict
    clean = state.logits if positions is None else state.logits[:, positions]
    effect_of = m.bind(sub, clean)
    if exact and not fastpath.replay_is_faithful(
        model, [plans[u] for u in fast_units], state, amask
    ):  # the replay would not be the forward here: the hooked forward decides
        effects.update(_hooked_effects(model, batch, fast_units, means, m, method, bar, False, src))
        return effects
    groups: dict[tuple[int, str], list[str]] = {}
    for u in fast_units:
        groups.setdefault(fastpath.group_key(plans[u]), []).append(u)
    for group in groups.values():
        k = 1 if exact else k_stack
        if k == 0:

            def run(kk: int, g: list[str] = group) -> Tensor:
                return fastpath.ablated_logits(
                    model,
                    [plans[x] for x in g[:kk]],
                    state,
                    means,
                    method,
                    amask,
                    positions,
                    source=src,
                )

            k = _calibrate(run, len(group))
        for start in range(0, len(group), k):
            chunk = group[start : start + k]
            logits = fastpath.ablated_logits(
                model,
                [plans[u] for u in chunk],
                state,
                means,
                method,
                amask,
                positions,
                exact=exact,
                source=src,
            )
            for i, u in enumerate(chunk):
                effects[u] = effect_of(logits[i])
            if bar is not None:
                bar.update(len(chunk))
    return effects


def corrupt_acts(model: nn.Module, batch: Any, keys: list[str]) -> dict[str, Tensor]:
    """Activations ``{key: [batch, ...]}`` at ``keys`` on the batch's corrupted input, from
    one forward: the values ``ablate(..., method="resample", source=corrupted)`` patches
    in, captured once for every unit of a sweep instead of once per unit."""
    with capture(model, keys, once=True) as store:
        run_model(model, resample_batch(batch, "resample"))
    return dict(store)
