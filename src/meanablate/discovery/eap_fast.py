"""EAP at the clean run from one plain forward and one backward of the model itself.

At the clean run every head's query, key and value read the same stream, so the model's
own forward serves: taps on ``hook_q``/``hook_k``/``hook_v`` (per head), ``hook_mlp_in``
and the last ``hook_resid_post`` give, after one backward (activation gradients only),
the gradient at each head's projection and at each MLP's normalised input. A
destination's *input* gradient follows by hand: through the projection
(``g_q[h] @ W_Q[h]^T``) and the layer norm's vector-Jacobian product
``(g*w - mean(g*w) - xhat * mean(g*w * xhat)) / scale`` (``xhat``, ``scale`` read at the
layer norm's hook points), for all heads and q/k/v at once. This avoids materialising a
separate stream per head input, which the masked forward needs only away from the clean
run (EAP-IG). The tests check it against the masked forward's probes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from meanablate.hooks import ActivationFn

__all__ = ["clean_pair_scores"]


def _ln_vjp_(ln: nn.Module, gw: Tensor, xhat: Tensor | None, scale: Tensor | None) -> Tensor:
    """In place: the gradient at a layer norm's input from ``gw [batch, t, pos, d]``, the
    gradient at its output already multiplied by the gain ``w`` (``t``: destinations
    reading that layer norm)."""
    if isinstance(ln, nn.Identity):
        return gw
    assert xhat is not None and scale is not None
    xh = xhat.unsqueeze(1)  # [batch, 1, pos, d]
    m1 = gw.mean(-1, keepdim=True)
    m2 = torch.einsum("btpd,bpd->btp", gw, xhat).unsqueeze(-1) / gw.shape[-1]
    gw.sub_(m1).sub_(xh * m2).div_(scale.unsqueeze(1))
    return gw


def _gain(ln: nn.Module) -> Tensor | None:
    return None if isinstance(ln, nn.Identity) else ln.w


@contextmanager
def _hooks_on(model: nn.Module, hooks: dict[str, ActivationFn]) -> Iterator[None]:
    """Forward hooks on our model's hook points, removed on exit (the modules found in
    one walk: resolving each path alone walks the model once per hook)."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for key, fn in hooks.items():

            def post(_m: nn.Module, _a: tuple, out: Tensor, _fn: ActivationFn = fn) -> Any:
                new = _fn(out)
                return out if new is None else new

            handles.append(modules[key].register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _pairs(*args: Any) -> Tensor:
    return _pairs_impl(*args)


def clean_pair_scores(data: Any, item: Any, metric: Any) -> Tensor:
    """``[n_src, n_dst, batch]``: EAP's ``(ablated_src - out_src) . d metric / d input_dst``
    at the clean run, for every (source, destination) pair."""
    fam, graph = data.family, data.graph
    model = fam.model
    cfg = fam.cfg
    n_layers = cfg.n_layers
    has_ln = not isinstance(model.blocks[0].ln1, nn.Identity)
    grad_keys = []
    for layer in range(n_layers):
        grad_keys += [f"blocks.{layer}.attn.hook_{c}" for c in "qkv"]
        if graph.has_mlp:
            grad_keys.append(f"blocks.{layer}.hook_mlp_in")
    grad_keys.append(f"blocks.{n_layers - 1}.hook_resid_post")
    keep_keys = ["hook_embed", "hook_pos_embed"]
    for layer in range(n_layers):
        keep_keys += [f"blocks.{layer}.attn.hook_z"]
        if graph.has_mlp:
            keep_keys.append(f"blocks.{layer}.hook_mlp_out")
        if has_ln:
            keep_keys += [f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.ln1.hook_normalized"]
            if graph.has_mlp:
                keep_keys += [
                    f"blocks.{layer}.ln2.hook_scale",
                    f"blocks.{layer}.ln2.hook_normalized",
                ]
    zs: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}

    def tap(key: str) -> Any:
        def fn(act: Tensor) -> Tensor:
            zs[key] = torch.zeros_like(act, requires_grad=True)
            return act + zs[key]

        return fn

    def keep(key: str) -> Any:
        def fn(act: Tensor) -> None:
            acts[key] = act.detach()

        return fn

    hooks = {k: keep(k) for k in keep_keys}
    hooks.update({k: tap(k) for k in grad_keys})
    with torch.inference_mode(False), torch.enable_grad(), _hooks_on(model, hooks):
        logits = model(item.tokens, item.mask)
        value = metric(logits, item.batch, item.clean)
        grads = dict(zip(grad_keys, torch.autograd.grad(value.sum(), [zs[k] for k in grad_keys])))

    return _pairs(data, item, acts, grads)


def _pairs_impl(data: Any, item: Any, acts: dict, grads: dict) -> Tensor:
    """The products, from the recorded activations and gradients (no graph)."""
    fam, graph = data.family, data.graph
    model, cfg = fam.model, fam.cfg
    n_layers, n_h = cfg.n_layers, cfg.n_heads
    b, p = item.tokens.shape
    d = cfg.d_model
    ablated = item.ablated
    # every node's change (ablated - clean), laid out per example: [batch, n_src, pos, d]
    delta = ablated.new_empty(b, len(graph.srcs), p, d)
    delta[:, 0] = ablated[0] - (acts["hook_embed"] + acts["hook_pos_embed"])
    i = 1
    for layer in range(n_layers):
        attn = model.blocks[layer].attn
        z = acts[f"blocks.{layer}.attn.hook_z"]
        heads = torch.einsum("bphe,hed->bhpd", z, attn.W_O)
        delta[:, i : i + n_h] = ablated[i : i + n_h].transpose(0, 1) - heads
        i += n_h
        if graph.has_mlp:
            delta[:, i] = ablated[i] - acts[f"blocks.{layer}.hook_mlp_out"]
            i += 1
    # every destination's input gradient, written in place group by group
    g_all = delta.new_empty(b, len(graph.dsts), p, d)
    d0 = 0
    for layer in range(n_layers):
        block = model.blocks[layer]
        attn = block.attn
        w1 = _gain(block.ln1)
        per = 3 if graph.split_qkv else 1
        group = g_all[:, d0 : d0 + n_h * per]
        for c, weight in enumerate((attn.W_Q, attn.W_K, attn.W_V)):
            # [head, batch * pos, d_head] @ [head, d_head, d_model], the gain folded in
            wt = (weight if w1 is None else weight * w1[:, None]).transpose(1, 2)
            gq = grads[f"blocks.{layer}.attn.hook_{'qkv'[c]}"]
            r = torch.bmm(gq.permute(2, 0, 1, 3).reshape(n_h, -1, gq.shape[-1]), wt)
            r = r.view(n_h, b, p, d).transpose(0, 1)  # [batch, head, pos, d]
            if per == 3:
                group[:, c::3] = r
            elif c == 0:
                group.copy_(r)
            else:
                group.add_(r)
        ln1 = (
            acts.get(f"blocks.{layer}.ln1.hook_normalized"),
            acts.get(f"blocks.{layer}.ln1.hook_scale"),
        )
        _ln_vjp_(block.ln1, group, *ln1)
        d0 += n_h * per
        if graph.has_mlp:
            ln2 = (
                acts.get(f"blocks.{layer}.ln2.hook_normalized"),
                acts.get(f"blocks.{layer}.ln2.hook_scale"),
            )
            g = grads[f"blocks.{layer}.hook_mlp_in"]
            w2 = _gain(block.ln2)
            group = g_all[:, d0 : d0 + 1]
            group[:, 0] = g if w2 is None else g * w2
            _ln_vjp_(block.ln2, group, *ln2)
            d0 += 1
    g_all[:, d0] = grads[f"blocks.{n_layers - 1}.hook_resid_post"]
    # one product per example: [batch, n_src, pos * d] @ [batch, pos * d, n_dst]
    # (pairs whose source comes after the destination are computed and never read)
    pairs = torch.bmm(
        delta.reshape(b, len(graph.srcs), -1), g_all.reshape(b, len(graph.dsts), -1).transpose(1, 2)
    )
    return pairs.permute(1, 2, 0)
