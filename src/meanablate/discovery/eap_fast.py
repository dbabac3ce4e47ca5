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
run (EAP-IG). The layer norm's VJP is never applied to a ``[batch, pos, d_model]``
gradient: it is folded into the contraction with the sources' changes (see
:func:`_pairs_impl`), so each layer costs one batched projection of its destinations'
gradients and one product with the sources before it. The tests check it against the
masked forward's probes and finite differences.

Cost on the benchmark model (bench_edges.py, 4 layers, d_model 256, batch 32 x 32): the
forward and backward with taps are ~2.1 forward-equivalents, the products ~1.0 (of which
the per-head projections ~0.3, the contractions ~0.3 and the head outputs ~0.1). The
backward already forms ``sum_h g_q[h] @ W_Q[h]^T``; the per-head projections repeat that
work, which a custom backward at the attention input could share.
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
        def fn(act: Tensor) -> Tensor | None:
            acts[key] = act.detach()
            # q, k, v, a layer norm's output and the last block's output are fresh tensors
            # with one reader, so their own gradient serves; without a layer norm mlp_in is
            # the stream itself, which the next block reads too
            if act.requires_grad and (has_ln or not key.endswith("hook_mlp_in")):
                zs[key] = act
                return None
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
    """The products, from the recorded activations and gradients (no graph).

    A destination reading through a layer norm has input gradient ``J y`` with
    ``y = (g @ W^T) * w`` (``g``: the gradient at its projection, ``w``: the gain) and
    ``J y = (y - mean(y) - xhat * mean(y * xhat)) / scale`` per position. Rather than
    apply ``J`` to every destination's ``[batch, pos, d_model]`` gradient (several passes
    over each), the score ``sum_{p,d} delta * J y`` is expanded: with ``y' = y / scale``
    (the division done on ``g``, ``d_model / d_head`` times smaller than ``y``) it is
    ``sum_p [<delta, y'> - sum_d(delta) mean(y') - <delta, xhat> mean(y' * xhat)]``, where
    ``mean(y') = g' . mean_d(W * w)`` and ``mean(y' * xhat) = g' . ((xhat * w) @ W) / d``
    with ``(xhat * w) @ W`` the recorded projection less its biases. Each layer's
    destinations are contracted only with the sources before them.
    """
    fam, graph = data.family, data.graph
    model, cfg = fam.model, fam.cfg
    n_layers, n_h, d_head = cfg.n_layers, cfg.n_heads, cfg.d_head
    b, p = item.tokens.shape
    d = cfg.d_model
    ablated = item.ablated
    n_src, n_dst = len(graph.srcs), len(graph.dsts)
    m = 1 if graph.has_mlp else 0
    # every node's change (ablated - clean), source-major: [n_src, batch, pos, d]
    delta = ablated.new_empty(n_src, b, p, d)
    delta[0] = ablated[0] - (acts["hook_embed"] + acts["hook_pos_embed"])
    i = 1
    for layer in range(n_layers):
        attn = model.blocks[layer].attn
        z = acts[f"blocks.{layer}.attn.hook_z"].permute(2, 0, 1, 3).reshape(n_h, b * p, -1)
        part = delta[i : i + n_h]
        torch.bmm(z, attn.W_O, out=part.view(n_h, b * p, d))  # each head's output
        part.neg_().add_(ablated[i : i + n_h])
        i += n_h
        if graph.has_mlp:
            torch.sub(ablated[i], acts[f"blocks.{layer}.hook_mlp_out"], out=delta[i])
            i += 1
    flat = delta.view(n_src, b, p * d).transpose(0, 1)  # [batch, n_src, pos * d]
    has_ln = not isinstance(model.blocks[0].ln1, nn.Identity)
    if has_ln:
        # sum_d(delta) and <delta, xhat> for every source, position and layer norm at once:
        # [batch * pos, n_src, d] @ [batch * pos, d, 1 + n_ln] (n_ln: ln1 and ln2 per layer)
        keys = [f"blocks.{layer}.ln{j}" for layer in range(n_layers) for j in (1, 2)[: 1 + m]]
        xs = delta.new_empty(b, p, 1 + len(keys), d)
        xs[:, :, 0] = 1
        for j, key in enumerate(keys):
            xs[:, :, 1 + j] = acts[f"{key}.hook_normalized"]
        st = torch.bmm(xs.view(b * p, -1, d), delta.view(n_src, b * p, d).permute(1, 2, 0))
        st = st.view(b, p, -1, n_src).permute(2, 0, 3, 1)  # [1 + n_ln, batch, n_src, pos]
        ln_index = {key: 1 + j for j, key in enumerate(keys)}
    out = delta.new_zeros(b, n_src, n_dst)
    per = 3 if graph.split_qkv else 1
    n_col = 3 * n_h + m  # this layer's destinations: q, k, v of each head, then the MLP
    # the logits read the last block's output: one more column, filled in the last layer
    y = delta.new_empty(n_col + 1, b * p, d)
    d0 = 0
    for layer in range(n_layers):
        block = model.blocks[layer]
        attn = block.attn
        ns = 1 + layer * (n_h + m)  # sources before this layer's attention
        ns2 = ns + n_h * m  # before its MLP
        w_qkv = torch.stack([attn.W_Q, attn.W_K, attn.W_V])  # [3, head, d_model, d_head]
        # [3, head, batch, pos, d_head]: the projections' gradients (divided by the scale)
        g = delta.new_empty(3, n_h, b, p, d_head)
        for c in range(3):
            gc = grads[f"blocks.{layer}.attn.hook_{'qkv'[c]}"].permute(2, 0, 1, 3)
            if has_ln:
                torch.div(gc, acts[f"blocks.{layer}.ln1.hook_scale"], out=g[c])
            else:
                g[c].copy_(gc)
        wt = w_qkv * block.ln1.w[:, None] if has_ln else w_qkv
        wt = wt.transpose(2, 3).reshape(3 * n_h, d_head, d)
        torch.bmm(g.view(3 * n_h, b * p, d_head), wt, out=y[: 3 * n_h])
        if m:
            gm = grads[f"blocks.{layer}.hook_mlp_in"]
            ym = y[3 * n_h].view(b, p, d)
            if has_ln:
                sc = acts[f"blocks.{layer}.ln2.hook_scale"]
                torch.mul(gm, block.ln2.w / sc, out=ym)
            else:
                ym.copy_(gm)
        last = layer == n_layers - 1
        if last:
            y[n_col].copy_(grads[f"blocks.{layer}.hook_resid_post"].view(b * p, d))
            ns2 = n_src
        # [batch, ns2, n_col (+ 1)]: <delta, y'> summed over positions and d_model
        cols = n_col + last
        raw = torch.bmm(
            y[:cols].view(cols, b, p * d).transpose(0, 1), flat[:, :ns2].transpose(1, 2)
        )
        raw = raw.transpose(1, 2)
        if has_ln:
            gv = g.view(3 * n_h, b, p, d_head)
            biases = torch.stack([attn.b_Q, attn.b_K, attn.b_V])  # [3, head, d_head]
            biases = biases + torch.einsum("d,chde->che", block.ln1.b, w_qkv)
            proj = delta.new_empty(3, n_h, b, p, d_head)
            for c in range(3):
                proj[c] = acts[f"blocks.{layer}.attn.hook_{'qkv'[c]}"].permute(2, 0, 1, 3)
            proj -= biases[:, :, None, None]
            m1 = (gv * wt.mean(-1)[:, None, None]).sum(-1)  # [3 * head, batch, pos]
            m2 = (gv * proj.view_as(gv)).sum(-1) / d
            i1 = ln_index[f"blocks.{layer}.ln1"]
            raw[:, :ns, : 3 * n_h] -= torch.bmm(st[0, :, :ns], m1.permute(1, 2, 0))
            raw[:, :ns, : 3 * n_h] -= torch.bmm(st[i1, :, :ns], m2.permute(1, 2, 0))
            if m:
                ym = y[3 * n_h].view(b, p, d)
                i2 = ln_index[f"blocks.{layer}.ln2"]
                xhat = acts[f"blocks.{layer}.ln2.hook_normalized"]
                m1 = ym.mean(-1)[..., None]  # [batch, pos, 1]
                m2 = torch.einsum("bpd,bpd->bp", ym, xhat)[..., None] / d
                nm = ns + n_h  # the sources the MLP reads
                raw[:, :nm, n_col - 1] -= torch.bmm(st[0, :, :nm], m1)[..., 0]
                raw[:, :nm, n_col - 1] -= torch.bmm(st[i2, :, :nm], m2)[..., 0]
        # columns are (q|k|v, head); the graph's destinations are (head, q|k|v) or
        # (head) with q, k and v summed
        attn_cols = raw[:, :ns, : 3 * n_h].reshape(b, ns, 3, n_h)
        if per == 3:
            out[:, :ns, d0 : d0 + 3 * n_h] = attn_cols.transpose(2, 3).reshape(b, ns, 3 * n_h)
        else:
            out[:, :ns, d0 : d0 + n_h] = attn_cols.sum(2)
        d0 += n_h * per
        if m:
            nm = ns + n_h
            out[:, :nm, d0] = raw[:, :nm, n_col - 1]
            d0 += 1
        if last:
            out[:, :, d0] = raw[:, :, n_col]
    return out.permute(1, 2, 0)
