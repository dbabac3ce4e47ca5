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

from typing import Any

import torch
from torch import Tensor, nn

from meanablate.hooks import hooked

__all__ = ["clean_pair_scores"]


def _ln_vjp(ln: nn.Module, g: Tensor, xhat: Tensor | None, scale: Tensor | None) -> Tensor:
    """Gradient at a layer norm's input from ``g`` at its output; ``g [..., d]`` may carry
    extra axes between ``[batch, pos]`` and ``d`` (heads, q/k/v)."""
    if isinstance(ln, nn.Identity):
        return g
    assert xhat is not None and scale is not None
    extra = g.ndim - xhat.ndim
    shape = (*xhat.shape[:2], *([1] * extra), xhat.shape[-1])
    xh = xhat.reshape(shape)
    sc = scale.reshape(*shape[:-1], 1)
    gw = g * ln.w
    return (gw - gw.mean(-1, keepdim=True) - xh * (gw * xh).mean(-1, keepdim=True)) / sc


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
    with torch.inference_mode(False), torch.enable_grad(), hooked(model, hooks):
        logits = model(item.tokens, item.mask)
        value = metric(logits, item.batch, item.clean)
        grads = dict(zip(grad_keys, torch.autograd.grad(value.sum(), [zs[k] for k in grad_keys])))

    # every node's clean output [n_src, batch, pos, d_model]
    outs = [acts["hook_embed"] + acts["hook_pos_embed"]]
    for layer in range(n_layers):
        attn = model.blocks[layer].attn
        outs += list(torch.einsum("bphe,hed->hbpd", acts[f"blocks.{layer}.attn.hook_z"], attn.W_O))
        if graph.has_mlp:
            outs.append(acts[f"blocks.{layer}.hook_mlp_out"])
    delta = item.ablated - torch.stack(outs)
    b = item.tokens.shape[0]
    pairs = delta.new_zeros(len(graph.srcs), len(graph.dsts), b)
    # [batch, n_src, pos * d_model]: each example's pair scores are one matrix product
    per_example = delta.expand(-1, b, -1, -1).transpose(0, 1).reshape(b, len(graph.srcs), -1)
    d0 = 0

    def score(g: Tensor) -> None:
        # Only sources before the group can feed it: contract those alone.
        nonlocal d0
        width = g.shape[2]
        n = max(e.src_index for e in graph.edges if e.dst_index == d0) + 1
        gt = g.transpose(2, 3).reshape(b, -1, width)  # [batch, pos * d_model, width]
        pairs[:n, d0 : d0 + width] = torch.bmm(per_example[:, :n], gt).permute(1, 2, 0)
        d0 += width

    for layer in range(n_layers):
        block = model.blocks[layer]
        attn = block.attn
        g_in = torch.stack(
            [
                torch.einsum("bphe,hde->bphd", grads[f"blocks.{layer}.attn.hook_{c}"], w)
                for c, w in zip("qkv", (attn.W_Q, attn.W_K, attn.W_V))
            ],
            dim=3,
        )  # [batch, pos, head, qkv, d_model]
        ln1 = (
            acts.get(f"blocks.{layer}.ln1.hook_normalized"),
            acts.get(f"blocks.{layer}.ln1.hook_scale"),
        )
        g_in = _ln_vjp(block.ln1, g_in, *ln1)
        if not graph.split_qkv:
            g_in = g_in.sum(3, keepdim=True)
        score(g_in.flatten(2, 3))
        if graph.has_mlp:
            ln2 = (
                acts.get(f"blocks.{layer}.ln2.hook_normalized"),
                acts.get(f"blocks.{layer}.ln2.hook_scale"),
            )
            score(_ln_vjp(block.ln2, grads[f"blocks.{layer}.hook_mlp_in"], *ln2).unsqueeze(2))
    score(grads[f"blocks.{n_layers - 1}.hook_resid_post"].unsqueeze(2))
    return pairs
