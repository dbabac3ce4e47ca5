"""Exact single-unit ablations on our transformer, re-running only what lies downstream.

Ablating a unit of block ``L`` cannot change blocks ``0..L-1``: the clean run's cached
streams stand in for them, and only the rest runs. Two routes:

- **Replay** (``exact=True``; every *discrete* metric, ``Metric.discrete``: accuracy, any
  argmax). The hook's replacement (the very function ``ablate()`` installs) is applied to
  the cached activation, and the rest of block ``L`` runs with the block's own operations
  in the block's own order (a head: ``resid_pre + hook_attn_out(W_O-projection of z)``,
  then the MLP half; a neuron: ``resid_mid + hook_mlp_out(post @ W_out + b_out)``), then
  every later block in full, on the batch as given, and the read positions are cut from
  the finished logits. Every step is one the hooked forward takes, on the same inputs
  and shapes, so with deterministic kernels (CPU; CUDA for equal shapes) the logits are
  bit for bit the hooked forward's. A check backs the construction: per batch, replaying
  each kind of unit with nothing replaced must give the clean logits bit for bit
  (:func:`replay_is_faithful`); where it does not, the hooked forward runs instead.
- **Linear shortcut** (continuous metrics). A head writes into the stream through
  ``W_O`` and a neuron through its row of ``W_out``, so the ablation changes the stream by
  ``(fill - act) @ W``, a thin product; the last block runs only at the positions the
  metric reads, and ablations may ride one forward as stacked copies of the batch.

Why: the two give the same number in exact arithmetic, but floats round differently. On
an exact tie of the ablated logits (common in compiled models such as tracr's) the
shortcut's residue of the clean answer decided the argmax: accuracy 1.0 where the hooked
forward gives 0.333, and discovery dropped the output head. A float error bound cannot
certify a tie (the margin is 0, and no cheap rigorous bound exists through softmax and
normalization), and stacking copies, the cut last block and the shortcut each change
bits (other matmul shapes, other summation order), so discrete metrics take none of
them. Continuous metrics move by ~1e-7 relative under such rounding, so they keep the
shortcut: measured in ``benchmarks/bench_discovery.py``, the replay costs +6% per unit
on a full-sequence neuron sweep and +12% (the full ``W_out`` product instead of one row)
to +90% (no cut last block) on a last-token one.

Only our own classes are replayed or shortcut (:func:`supports`): a subclass may compute
its forward differently, and then the hooked forward is the only definition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from meanablate.hooks import capture
from meanablate.intervene import _fill_for, _make_hook, unit_mask, view_shape
from meanablate.organisms.transformer import (
    MLP,
    Attention,
    HookedTransformer,
    LayerNorm,
    TransformerBlock,
)
from meanablate.sites import Site, parse_site
from meanablate.stats import Means

__all__ = [
    "Plan",
    "ablated_act",
    "ablated_logits",
    "clean_state",
    "plan_unit",
    "replay_is_faithful",
    "supports",
]


_ORDER = {"pre": 0, "mid": 1, "post": 2}


@dataclass(frozen=True)
class Plan:
    """How to ablate one unit: which activation, and where the stream resumes.

    ``resume``: ``"post"`` (add delta to resid_post of ``layer``, run from ``layer+1``),
    ``"mid"`` (add to resid_mid, finish the block's MLP, then ``layer+1``) or ``"pre"``
    (replace resid_pre of ``layer``, run from ``layer``).
    """

    site: Site
    layer: int
    kind: str
    resume: str


def supports(model: Any) -> bool:
    """Whether ``model`` is built of exactly our classes, whose forward the replay mirrors."""
    if type(model) is not HookedTransformer:
        return False
    norms = (LayerNorm, nn.Identity)
    for block in model.blocks:
        if type(block) is not TransformerBlock or type(block.attn) is not Attention:
            return False
        if type(block.ln1) not in norms or (
            hasattr(block, "mlp") and (type(block.mlp) is not MLP or type(block.ln2) not in norms)
        ):
            return False
    return type(model.ln_final) in norms


def plan_unit(model: HookedTransformer, unit: str | Site) -> Plan | None:
    """A :class:`Plan` for units the fast path handles, ``None`` for the others."""
    site = parse_site(unit) if isinstance(unit, str) else unit
    if site.io != "output":
        return None
    parts = site.module.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    layer, rest = int(parts[1]), ".".join(parts[2:])
    if layer >= model.cfg.n_layers:
        return None
    has_mlp = model.cfg.d_mlp is not None
    table = {
        "attn.hook_z": ("head", "mid" if has_mlp else "post"),
        "hook_attn_out": ("attn_out", "mid" if has_mlp else "post"),
        "mlp.hook_post": ("neuron", "post"),
        "hook_mlp_out": ("mlp_out", "post"),
        "hook_resid_pre": ("resid", "pre"),
        "hook_resid_post": ("resid", "post"),
    }
    if rest not in table or ((rest.startswith("mlp") or rest == "hook_mlp_out") and not has_mlp):
        return None
    kind, resume = table[rest]
    return Plan(site, layer, kind, resume)


@dataclass
class CleanState:
    """Clean activations of one batch: residual streams per layer and unit activations."""

    resid_pre: list[Tensor]
    resid_mid: list[Tensor]
    resid_post: list[Tensor]
    acts: dict[str, Tensor]
    logits: Tensor


def clean_state(
    model: HookedTransformer, tokens: Tensor, attention_mask: Tensor | None, keys: list[str]
) -> CleanState:
    """One clean forward recording every residual stream and the activations at ``keys``."""
    n = model.cfg.n_layers
    stream = [f"blocks.{i}.hook_resid_pre" for i in range(n)]
    stream += [f"blocks.{i}.hook_resid_post" for i in range(n)]
    if model.cfg.d_mlp is not None:
        stream += [f"blocks.{i}.hook_resid_mid" for i in range(n)]
    with capture(model, sorted(set(stream) | set(keys)), once=True) as store:
        logits = model(tokens, attention_mask)
    mids = [store.get(f"blocks.{i}.hook_resid_mid") for i in range(n)]
    return CleanState(
        [store[f"blocks.{i}.hook_resid_pre"] for i in range(n)],
        mids,  # type: ignore[arg-type]
        [store[f"blocks.{i}.hook_resid_post"] for i in range(n)],
        {k: store[k] for k in keys},
        logits,
    )


def _delta(
    model: HookedTransformer,
    plan: Plan,
    act: Tensor,
    means: Means | None,
    method: str,
    source: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The exact change ``[batch, pos, d_model]`` (or new resid) the ablation causes.

    ``source``: for ``method="resample"``, the corrupted run's activations by site key
    (a per-example fill ``[batch, pos, ...]``; the difference is per example anyway)."""
    site = plan.site
    fill = _fill_for(site, act, means, method, source)  # type: ignore[arg-type]
    block = model.blocks[plan.layer]
    pos_w = None
    if site.positions is not None:
        pos_w = torch.zeros(act.shape[1], 1, dtype=act.dtype, device=act.device)
        pos_w[list(site.positions)] = 1
    if plan.kind == "neuron" and site.neurons is not None:
        # Only the chosen columns move: a thin matmul instead of a masked full one.
        idx = list(site.neurons)
        f = fill if fill.ndim == 0 else fill[..., idx]
        diff = f - act[..., idx]
        if pos_w is not None:
            diff = diff * pos_w
        return diff @ block.mlp.W_out[idx]
    if plan.kind == "head" and site.heads is not None:
        idx = list(site.heads)
        f = fill if fill.ndim == 0 else fill[..., idx, :]
        diff = f - act[..., idx, :]
        if pos_w is not None:
            diff = diff * pos_w[..., None]
        return torch.einsum("bphe,hed->bpd", diff, block.attn.W_O[idx])
    mask = unit_mask(site, tuple(act.shape), act.device)
    vact = act.reshape(view_shape(site, tuple(act.shape)))
    diff = torch.where(mask, fill - vact, torch.zeros((), dtype=act.dtype, device=act.device))
    if plan.kind == "head":
        return torch.einsum("bphe,hed->bpd", diff, block.attn.W_O)
    if plan.kind == "neuron":
        return diff @ block.mlp.W_out
    return diff.reshape(act.shape)  # attn_out, mlp_out, resid: the activation is the stream


def ablated_act(
    plan: Plan,
    act: Tensor,
    means: Means | None,
    method: str,
    source: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The activation as the hook of ``ablate(model, plan.site, ...)`` replaces it."""
    return _make_hook([plan.site], means, method, source)(act)  # type: ignore[arg-type]


def resumed_stream(model: HookedTransformer, plan: Plan, state: CleanState, new: Tensor) -> Tensor:
    """The stream where ``plan`` resumes, with its activation replaced by ``new``.

    ``resid_pre`` / ``resid_mid`` / ``resid_post`` of ``plan.layer`` for ``plan.resume``
    ``"pre"`` / ``"mid"`` / ``"post"``. The rest of the plan's sub-layer runs with the
    block's own operations in its own order, from the clean run's cached stream (which
    the ablation cannot change): bit for bit the hooked forward's stream there.
    """
    layer, kind = plan.layer, plan.kind
    block = model.blocks[layer]
    if kind == "resid":
        return new
    if kind in ("head", "attn_out"):
        # TransformerBlock.forward: resid + hook_attn_out(attn(...)), where attn ends
        # with head_outputs_to_resid(hook_z(z)).
        out = block.hook_attn_out(block.attn.head_outputs_to_resid(new)) if kind == "head" else new
        resid = state.resid_pre[layer] + out
        return resid if plan.resume == "mid" else block.hook_resid_post(resid)
    # MLP.forward ends with hook_post(post) @ W_out + b_out
    out = block.hook_mlp_out(new @ block.mlp.W_out + block.mlp.b_out) if kind == "neuron" else new
    return block.hook_resid_post(state.resid_mid[layer] + out)


def replay_stream(
    model: HookedTransformer, plans: list[Plan], state: CleanState, news: list[Tensor]
) -> tuple[Tensor, int]:
    """The stream entering block ``start`` for each plan (stacked along the batch), and
    ``start``. The plans share ``layer`` and ``resume``; ``news`` are their ablated
    activations. With one plan, bit for bit the hooked forward's stream."""
    streams = [resumed_stream(model, p, state, n) for p, n in zip(plans, news)]
    resid = streams[0] if len(streams) == 1 else torch.cat(streams, dim=0)
    layer, resume = plans[0].layer, plans[0].resume
    if resume == "pre":
        return resid, layer
    if resume == "mid":
        return finish_block_from_mid(model.blocks[layer], resid), layer + 1
    return resid, layer + 1


def replay_is_faithful(
    model: HookedTransformer, plans: list[Plan], state: CleanState, attention_mask: Tensor | None
) -> bool:
    """Whether replaying nothing replaced gives the clean logits bit for bit, for the last
    plan of each kind among ``plans`` (each kind replays its block its own way).

    The replay mirrors our classes' forward; this catches what construction cannot
    promise (a kernel that is not deterministic on this device, say). Cheap: the last
    plan of a kind runs the fewest blocks.
    """
    last: dict[str, Plan] = {}
    for plan in sorted(plans, key=lambda p: (p.layer, _ORDER[p.resume])):
        last[plan.kind] = plan
    with torch.inference_mode():
        for plan in last.values():
            resid, start = replay_stream(model, [plan], state, [state.acts[plan.site.key]])
            logits = run_downstream(model, resid, start, attention_mask, None)
            if not torch.equal(logits, state.logits):
                return False
    return True


def ablated_logits(
    model: HookedTransformer,
    plans: list[Plan],
    state: CleanState,
    means: Means | None,
    method: str,
    attention_mask: Tensor | None,
    positions: Tensor | None,
    *,
    exact: bool = False,
    source: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Logits ``[len(plans), batch, n_positions, vocab]`` with each plan ablated alone.

    All plans must share ``layer`` and ``resume`` (they are stacked along the batch).
    ``positions``: indices of the positions whose logits are needed (``None``: all).
    ``exact``: bit for bit the logits of the hooked forward (the replay, one plan, every
    block in full, the positions cut from the finished logits); otherwise the linear
    shortcut with the last block computed only at ``positions`` (the same logits up to
    float rounding). ``source``: for ``method="resample"``, the corrupted run's
    activations by site key (captured once for every plan).
    """
    k = len(plans)
    b = state.logits.shape[0]
    if exact:
        if k != 1:
            raise ValueError(f"exact logits come one plan at a time, got {k}")
        new = ablated_act(plans[0], state.acts[plans[0].site.key], means, method, source)
        resid, start = replay_stream(model, plans, state, [new])
        logits = run_downstream(model, resid, start, attention_mask, None)
        if positions is not None:
            logits = logits[:, positions]
        return logits[None]
    deltas = [_delta(model, p, state.acts[p.site.key], means, method, source) for p in plans]
    delta = torch.cat(deltas, dim=0)
    mask = attention_mask.repeat(k, 1) if attention_mask is not None else None
    resid, start = resume_stream(model, state, plans[0].layer, plans[0].resume, delta, copies=k)
    logits = run_downstream(model, resid, start, mask, positions)
    return logits.reshape(k, b, *logits.shape[1:])


def resume_stream(
    model: HookedTransformer,
    state: CleanState,
    layer: int,
    resume: str,
    delta: Tensor,
    copies: int = 1,
) -> tuple[Tensor, int]:
    """The stream with ``delta`` applied where a plan resumes, and the next block to run.

    ``copies``: the clean stream is repeated that many times along the batch (``delta``
    then holds one change per copy).
    """

    def rep(t: Tensor) -> Tensor:
        return t if copies == 1 else t.repeat(copies, *([1] * (t.ndim - 1)))

    if resume == "pre":
        return rep(state.resid_pre[layer]) + delta, layer
    if resume == "mid":
        mid = rep(state.resid_mid[layer]) + delta
        return finish_block_from_mid(model.blocks[layer], mid), layer + 1
    return rep(state.resid_post[layer]) + delta, layer + 1


def finish_block_from_mid(block: Any, mid: Tensor) -> Tensor:
    """A block's output from its ``resid_mid``: the MLP half, through its hook points."""
    resid = block.hook_resid_mid(mid)
    resid = resid + block.hook_mlp_out(block.mlp(block.hook_mlp_in(block.ln2(resid))))
    return block.hook_resid_post(resid)


def run_downstream(
    model: HookedTransformer,
    resid: Tensor,
    start: int,
    key_mask: Tensor | None,
    positions: Tensor | None,
) -> Tensor:
    """Logits from the stream before block ``start``, at ``positions`` only (``None``: all).

    With ``positions``, the last block runs through :func:`last_block_at`, which skips
    its hook points: give ``positions=None`` when a hook there must fire.
    """
    blocks = list(model.blocks[start:])
    if positions is not None and blocks:
        for block in blocks[:-1]:
            resid = block(resid, key_mask)
        resid = last_block_at(blocks[-1], resid, positions, key_mask)
    else:
        for block in blocks:
            resid = block(resid, key_mask)
        if positions is not None:
            resid = resid[:, positions]
    return model.unembed(resid)


def tokens_and_mask(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(tokens, attention_mask or None)`` of a batch given as a dict or a bare tensor."""
    if isinstance(batch, Mapping):
        return batch["tokens"], batch.get("attention_mask")
    return batch, None


def last_block_at(block: Any, resid: Tensor, positions: Tensor, key_mask: Tensor | None) -> Tensor:
    """The last block's output ``[batch, len(positions), d_model]`` at ``positions`` only.

    Keys and values still come from every position; queries, the MLP and the residual
    update run only where the metric reads, which is all the unembedding needs.
    """
    attn = block.attn
    x = block.ln1(resid)
    q = torch.einsum("bpd,hde->bphe", x[:, positions], attn.W_Q) + attn.b_Q
    k = torch.einsum("bpd,hde->bphe", x, attn.W_K) + attn.b_K
    v = torch.einsum("bpd,hde->bphe", x, attn.W_V) + attn.b_V
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / attn.cfg.d_head**0.5
    if attn.cfg.causal:
        later = torch.arange(x.shape[1], device=x.device)[None, :] > positions[:, None]
        scores = scores.masked_fill(later, float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    pattern = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
    out = resid[:, positions] + attn.head_outputs_to_resid(z)
    if hasattr(block, "mlp"):
        out = out + block.mlp(block.ln2(out))
    return out


def group_key(plan: Plan) -> tuple[int, str]:
    return plan.layer, plan.resume


def any_hooks(model: Any) -> bool:
    """True if any module carries hooks (the fast path would bypass them).

    Hooks a model's own framework installs do not count: those of a TransformerLens
    bridge's blocks (:func:`~meanablate.families.tl_bridge.own_hook_ids`, inside the
    blocks, so they fire on a resumed block too) and transformers' output-capturing
    hooks (inert unless the forward is asked for attentions or hidden states).
    """
    from meanablate.families.tl_bridge import own_hook_ids

    own = own_hook_ids(model)

    def foreign(hooks: dict) -> bool:
        return any(
            k not in own and (getattr(fn, "__module__", None) or "").split(".")[0] != "transformers"
            for k, fn in hooks.items()
        )

    return any(foreign(m._forward_hooks) or foreign(m._forward_pre_hooks) for m in model.modules())
