"""The metric of many ablated *sets* of units on fixed batches, for pruning.

Pruning (ACDC, score-then-prune, minimality) asks for the metric of one ablated set after
another on the same batches. :class:`SetMetric` computes the clean side once: the clean
outputs that comparing metrics read and, on our :class:`HookedTransformer`, the clean
residual streams. A set then runs only from its earliest unit on: that unit's group
(units of one activation, merged into one) enters as the exact linear change of the
stream, as in the sweep's fast path, and every later unit is ablated by its hook on the
way down. Anything else (other models, foreign hooks, resampling, units the fast path does
not know) takes one hooked full forward per batch, the plain definition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from meanablate.discovery import fastpath
from meanablate.discovery.evaluate import (
    CLEAN_CACHE_BYTES,
    clean_outputs,
    metric_per_example,
    needs_clean,
)
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
    path). Equal to :func:`~meanablate.discovery.metric_per_example` for every set, within
    float32 rounding of the residual stream.
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
        self.model, self.means, self.method = model, means, method
        self.metric = get_metric(metric)
        device = model_device(model)
        self.batches = [to_device(b, device) for b in batches]
        self.plans: dict[str, fastpath.Plan] = {}
        self.states: list[fastpath.CleanState] | None = None
        if isinstance(model, HookedTransformer) and method in ("mean", "zero"):
            plans = {u: fastpath.plan_unit(model, u) for u in units}
            self.plans = {u: p for u, p in plans.items() if p is not None}
            self.states = self._clean_states() if self.plans else None
        if self.states is not None:
            self.clean: list[Tensor] | None = [s.logits for s in self.states]
        else:
            self.clean = clean_outputs(model, self.batches) if needs_clean(self.metric) else None

    def _clean_states(self) -> list[fastpath.CleanState] | None:
        keys = sorted({p.site.key for p in self.plans.values()})
        states, total = [], 0
        with torch.inference_mode():
            for batch in self.batches:
                tokens, amask = _tokens(batch)
                state = fastpath.clean_state(self.model, tokens, amask, keys)  # type: ignore[arg-type]
                tensors = [*state.resid_pre, *state.resid_mid, *state.resid_post, state.logits]
                tensors += list(state.acts.values())
                total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
                if total > CLEAN_CACHE_BYTES:
                    return None  # too big to keep: every set takes a full forward
                states.append(state)
        return states

    def __call__(self, ablated: Sequence[str]) -> Tensor:
        ablated = list(ablated)
        split = self._split(ablated) if ablated else None
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
            for batch, state in zip(self.batches, self.states):
                values.append(self._one_batch(batch, state, group, bool(rest)).double().cpu())
        return torch.cat(values)

    def _split(self, ablated: list[str]) -> tuple[fastpath.Plan, list[str]] | None:
        """The earliest units merged into one plan, and the units left to hooks."""
        if self.states is None or fastpath.any_hooks(self.model):
            return None  # (the fast path would bypass a user's hooks)
        planned = [u for u in ablated if u in self.plans]
        if not planned:
            return None
        first = min((self.plans[u].layer, _ORDER[self.plans[u].resume]) for u in planned)
        group = [u for u in planned if (self.plans[u].layer, _ORDER[self.plans[u].resume]) == first]
        merged = _merge([self.plans[u] for u in group])
        if merged is None:
            return None  # e.g. a neuron and its whole MLP together: not one linear change
        rest = [u for u in ablated if u not in set(group)]
        # every other unit must sit where the resumed run still passes its hook
        if not all(_after(parse_site(u).module, merged) for u in rest):
            return None
        return merged, rest

    def _one_batch(
        self, batch: Any, state: fastpath.CleanState, plan: fastpath.Plan, hooks: bool
    ) -> Tensor:
        model = self.model
        assert isinstance(model, HookedTransformer)
        _, amask = _tokens(batch)
        act = state.acts[plan.site.key]
        delta = fastpath._delta(model, plan, act, self.means, self.method)
        layer = plan.layer
        if plan.resume == "pre":
            resid, start = state.resid_pre[layer] + delta, layer
        elif plan.resume == "mid":
            # finish the block through its hook points: later units may sit there
            block = model.blocks[layer]
            resid = block.hook_resid_mid(state.resid_mid[layer] + delta)
            resid = resid + block.hook_mlp_out(block.mlp(block.hook_mlp_in(block.ln2(resid))))
            resid, start = block.hook_resid_post(resid), layer + 1
        else:
            resid, start = state.resid_post[layer] + delta, layer + 1
        bdict = batch if isinstance(batch, Mapping) else {"tokens": batch}
        positions, sub = restrict_positions(bdict, state.logits)
        blocks = list(model.blocks[start:])
        # The last block at a few positions bypasses its hook points: only without hooks.
        if positions is not None and blocks and not hooks:
            for block in blocks[:-1]:
                resid = block(resid, amask)
            resid = fastpath.last_block_at(blocks[-1], resid, positions, amask)
            clean = state.logits[:, positions]
            return self.metric(model.unembed(resid), sub, clean)
        for block in blocks:
            resid = block(resid, amask)
        return self.metric(model.unembed(resid), bdict, state.logits)


def _tokens(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Mapping):
        return batch["tokens"], batch.get("attention_mask")
    return batch, None


_MLP_HALF = ("hook_resid_mid", "hook_mlp_in", "hook_mlp_out", "hook_resid_post")


def _after(module: str, plan: fastpath.Plan) -> bool:
    """Whether a run resumed at ``plan`` still passes through ``module``'s hooks."""
    parts = module.split(".", 2)
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return False
    layer, rest = int(parts[1]), parts[2]
    if layer != plan.layer:
        return layer > plan.layer
    if plan.resume == "pre":  # the whole block re-runs (its resid_pre is the group's)
        return rest != "hook_resid_pre"
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
    merged = parse_site(str(first.with_units(**{axis: union})))
    return fastpath.Plan(merged, group[0].layer, group[0].kind, group[0].resume)
