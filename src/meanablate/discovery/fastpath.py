"""Exact single-unit ablations on our transformer, re-running only what lies downstream.

A head writes into the residual stream through ``W_O`` and an MLP neuron through its row
of ``W_out``; both are linear, so ablating the unit changes the stream by exactly
``(fill - act) @ W``. The downstream part therefore starts from ``resid + delta`` — at the
next block for an MLP unit (and for a head in an attention-only block), at the MLP of the
same block for a head — instead of re-running the whole model. The last step computes
logits only at the positions the metric reads. Many units can ride one forward pass as
stacked copies of the batch (``stack``); the result is the same ablation, unit by unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from meanablate.hooks import capture
from meanablate.intervene import _fill_for, unit_mask, view_shape
from meanablate.organisms.transformer import HookedTransformer
from meanablate.sites import Site, parse_site
from meanablate.stats import Means

__all__ = ["Plan", "ablated_logits", "clean_state", "plan_unit"]


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
    with capture(model, sorted(set(stream) | set(keys))) as store:
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
    model: HookedTransformer, plan: Plan, act: Tensor, means: Means | None, method: str
) -> Tensor:
    """The exact change ``[batch, pos, d_model]`` (or new resid) the ablation causes."""
    site = plan.site
    fill = _fill_for(site, act, means, method, None)  # type: ignore[arg-type]
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


def ablated_logits(
    model: HookedTransformer,
    plans: list[Plan],
    state: CleanState,
    means: Means | None,
    method: str,
    attention_mask: Tensor | None,
    positions: Tensor | None,
) -> Tensor:
    """Logits ``[len(plans), batch, n_positions, vocab]`` with each plan ablated alone.

    All plans must share ``layer`` and ``resume`` (they are stacked along the batch).
    ``positions``: indices of the positions whose logits are needed (``None``: all).
    """
    layer, resume = plans[0].layer, plans[0].resume
    b = state.logits.shape[0]
    deltas = [_delta(model, p, state.acts[p.site.key], means, method) for p in plans]
    delta = torch.cat(deltas, dim=0)
    k = len(plans)
    mask = attention_mask.repeat(k, 1) if attention_mask is not None else None
    resid, start = resume_stream(model, state, layer, resume, delta, copies=k)
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
    """True if any module carries hooks (the fast path would bypass them)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
