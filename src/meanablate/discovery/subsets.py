"""The metric of many ablated *sets* of units on fixed batches, for pruning.

Pruning (ACDC, score-then-prune, minimality) asks for the metric of one ablated set after
another on the same batches. :class:`SetMetric` computes the clean side once: the clean
outputs that comparing metrics read and, on our :class:`HookedTransformer`, the clean
residual streams. A set then runs only from its earliest unit on: that unit's group
(units of one activation, merged into one) enters as in the sweep's fast path
(:mod:`~meanablate.discovery.fastpath`), and every later unit is ablated by its hook on
the way down. For discrete metrics the group's block is replayed as the block computes
it and every block runs in full, so the logits are bit for bit those of the hooked
forward (ties included); continuous metrics take the linear shortcut. Anything else
(other models, foreign hooks, resampling, units the fast path does not know) takes one
hooked full forward per batch, the plain definition — except on families that resume
from a block (Hugging Face, TransformerLens bridges): there a set runs from its earliest
unit's block, its units ablated by their hooks (:mod:`~meanablate.discovery.set_resume`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from meanablate._unwrap import unwrap
from meanablate.discovery import fastpath, layerskip
from meanablate.discovery.evaluate import (
    CLEAN_CACHE_BYTES,
    clean_outputs,
    metric_per_example,
    needs_clean,
)
from meanablate.discovery.set_resume import ResumedSets
from meanablate.discovery.sweep import restrict_positions
from meanablate.hooks import model_device, to_device
from meanablate.intervene import Method, ablate
from meanablate.metrics import Metric, get_metric
from meanablate.organisms.transformer import HookedTransformer
from meanablate.sites import Site, parse_site
from meanablate.stats import Means

__all__ = ["SetMetric"]

_ORDER = {"pre": 0, "mid": 1, "post": 2}
_AXES = ("neurons", "heads", "positions")


class SetMetric:
    """``metric(ablated) -> [n_examples]``: the metric with ``ablated`` units ablated together.

    ``units``: every unit a set may contain (their activations are cached for the fast
    path). Equal to :func:`~meanablate.discovery.metric_per_example` for every set: exactly
    for discrete metrics, and for continuous ones up to float32 rounding of the stream.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        units: Sequence[str],
        means: Means | None,
        metric: str | Metric,
        *,
        method: Method = "mean",
    ) -> None:
        model = unwrap(model)
        self.model, self.means, self.method = model, means, method
        self.metric = get_metric(metric)
        device = model_device(model)
        self.batches = [to_device(b, device) for b in batches]
        self.plans: dict[str, fastpath.Plan] = {}
        self.states: list[fastpath.CleanState] | None = None
        self.reads: list[tuple[Tensor | None, dict, Tensor]] = []
        if fastpath.supports(model) and method in ("mean", "zero"):
            plans = {u: fastpath.plan_unit(model, u) for u in units}
            self.plans = {u: p for u, p in plans.items() if p is not None}
            self.states = self._clean_states() if self.plans else None
        self.resumed: ResumedSets | None = None
        if self.states is None:
            self.resumed = ResumedSets.build(model, self.batches, self.metric, method)
        if self.states is not None:
            self.clean: list[Tensor] | None = [s.logits for s in self.states]
        elif self.resumed is not None:  # its clean run is the one clean_outputs would run
            self.clean = self.resumed.clean if needs_clean(self.metric) else None
        else:
            self.clean = clean_outputs(model, self.batches) if needs_clean(self.metric) else None

    def _clean_states(self) -> list[fastpath.CleanState] | None:
        keys = sorted({p.site.key for p in self.plans.values()})
        states, total = [], 0
        with torch.inference_mode():
            for batch in self.batches:
                tokens, amask = fastpath.tokens_and_mask(batch)
                state = fastpath.clean_state(self.model, tokens, amask, keys)  # type: ignore[arg-type]
                tensors = [*state.resid_pre, *state.resid_mid, *state.resid_post, state.logits]
                tensors += list(state.acts.values())
                total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
                if total > CLEAN_CACHE_BYTES:
                    return None  # too big to keep: every set takes a full forward
                states.append(state)
        if self.metric.discrete:
            plans = list(self.plans.values())
            for batch, state in zip(self.batches, states):
                _, amask = fastpath.tokens_and_mask(batch)
                if not fastpath.replay_is_faithful(self.model, plans, state, amask):  # type: ignore[arg-type]
                    return None  # not bit for bit the forward here: every set runs it
        # What the metric reads of each batch does not depend on the set: cut it once.
        for batch, state in zip(self.batches, states):
            bdict = batch if isinstance(batch, Mapping) else {"tokens": batch}
            positions, sub = restrict_positions(bdict, state.logits)
            clean = state.logits if positions is None else state.logits[:, positions]
            self.reads.append((positions, sub, clean))
        return states

    def __call__(self, ablated: Sequence[str]) -> Tensor:
        ablated = list(ablated)
        split = self._split(ablated) if ablated else None
        if split is None and ablated and self.resumed is not None:
            span = self.resumed.start(ablated)
            if span is not None:
                return self.resumed(ablated, self.means, self.method, span)
        if split is None:
            return metric_per_example(
                self.model,
                self.batches,
                ablated,
                self.means,
                self.metric,
                method=self.method,
                clean=self.clean,
            )
        assert self.states is not None
        group, rest = split
        values = []
        with torch.inference_mode(), ablate(self.model, rest, self.means, method=self.method):
            for batch, state, reads in zip(self.batches, self.states, self.reads):
                out = self._one_batch(batch, state, reads, group, bool(rest))
                values.append(out.double().cpu())
        return torch.cat(values)

    def _split(self, ablated: list[str]) -> tuple[fastpath.Plan, list[str]] | None:
        """The earliest units merged into one plan, and the units left to hooks."""
        if self.states is None or fastpath.any_hooks(self.model):
            return None  # (the fast path would bypass a user's hooks)
        planned = [u for u in ablated if u in self.plans]
        if not planned:
            return None
        point = {u: (self.plans[u].layer, _ORDER[self.plans[u].resume]) for u in planned}
        first = min(point.values())
        group = {u for u in planned if point[u] == first}
        merged = _merge([self.plans[u] for u in planned if u in group])
        if merged is None:
            return None  # e.g. a neuron and its whole MLP together: not one linear change
        rest = [u for u in ablated if u not in group]
        # every other unit must sit where the resumed run still passes its hook
        if not all(_after(parse_site(u).module, merged, self.model) for u in rest):
            return None
        return merged, rest

    def _one_batch(
        self,
        batch: Any,
        state: fastpath.CleanState,
        reads: tuple[Tensor | None, dict, Tensor],
        plan: fastpath.Plan,
        hooks: bool,
    ) -> Tensor:
        model = self.model
        assert isinstance(model, HookedTransformer)
        _, amask = fastpath.tokens_and_mask(batch)
        exact = self.metric.discrete
        act = state.acts[plan.site.key]
        if exact:  # replayed as the hooked forward computes it: bit for bit its logits
            new = fastpath.ablated_act(plan, act, self.means, self.method)
            resid, start = fastpath.replay_stream(model, [plan], state, [new])
        else:  # the linear shortcut: the same up to float rounding
            delta = fastpath._delta(model, plan, act, self.means, self.method)
            resid, start = fastpath.resume_stream(model, state, plan.layer, plan.resume, delta)
        positions, sub, clean = reads
        # Only a block still to run may be cut to the read positions (last_block_at, which
        # skips hook points, so not with hooks; nor for a discrete metric, whose ties the
        # cut's rounding could break). Otherwise the whole output: an unchanged stream then
        # gives exactly the clean logits (a dead unit scores 0.0).
        if exact or hooks or positions is None or start >= model.cfg.n_layers:
            logits = fastpath.run_downstream(model, resid, start, amask, None)
            bdict = batch if isinstance(batch, Mapping) else {"tokens": batch}
            return self.metric(logits, bdict, state.logits)
        logits = fastpath.run_downstream(model, resid, start, amask, positions)
        return self.metric(logits, sub, clean)


_MLP_HALF = ("hook_resid_mid", "hook_mlp_in", "hook_mlp_out", "hook_resid_post")


def _after(module: str, plan: fastpath.Plan, model: HookedTransformer) -> bool:
    """Whether a run resumed at ``plan`` still passes through ``module``'s hooks."""
    layer = layerskip.block_of(module, "blocks", model.cfg.n_layers)
    if layer is None:
        return False
    if layer != plan.layer:
        return layer > plan.layer  # later blocks run whole, through every hook point
    rest = module.split(".", 2)[2] if module.count(".") >= 2 else ""
    if plan.resume == "pre":  # the whole block re-runs (its resid_pre is the group's)
        return bool(rest) and rest != "hook_resid_pre"
    if plan.resume == "mid":  # the MLP half re-runs through its hook points
        return rest in _MLP_HALF or rest.startswith("mlp.")
    return False


def _merge(group: list[fastpath.Plan]) -> fastpath.Plan | None:
    """One plan ablating the union of ``group``'s units (same activation, one selector)."""
    if len(group) == 1:
        return group[0]
    sites: list[Site] = [p.site for p in group]
    first = sites[0]
    if any(s.key != first.key or s.n_heads != first.n_heads for s in sites):
        return None
    axes = {tuple(a for a in _AXES if getattr(s, a) is not None) for s in sites}
    if len(axes) != 1 or len(next(iter(axes))) != 1:
        return None
    (axis,) = next(iter(axes))
    union = tuple(sorted({i for s in sites for i in getattr(s, axis)}))
    merged = first.with_units(**{axis: union})
    return fastpath.Plan(merged, group[0].layer, group[0].kind, group[0].resume)
