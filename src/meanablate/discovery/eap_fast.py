"""EAP at the clean run from one plain forward and one backward of the model itself.

At the clean run every head's query, key and value read the same stream, so the model's
own forward serves: one backward (activation gradients only) gives the gradient at each
head's projection (``hook_q``/``hook_k``/``hook_v``), at each MLP's normalised input
(``hook_mlp_in``) and at the last ``hook_resid_post``. A destination's *input* gradient
follows through the projection (``g_q[h] @ W_Q[h]^T``) and the layer norm's
vector-Jacobian product ``(g*w - mean(g*w) - xhat * mean(g*w * xhat)) / scale``. The
per-head products are formed once, by a custom backward at q, k and v
(:class:`_SharedProjection`) that keeps them and passes their sum on, where autograd would
form the sum itself; the layer norm's centring is never applied to a
``[batch, pos, d_model]`` gradient but folded into the contraction with the sources'
changes (:func:`_pairs_impl`). Each head's output is recorded at ``hook_result`` (the
forward then forms it per head). This avoids materialising a separate stream per head input,
which the masked forward needs only away from the clean run (EAP-IG). The tests check it
against the masked forward's probes and finite differences.

Cost on the benchmark model (bench_edges.py: 4 layers, d_model 256, batch 32 x 32, one
thread): ~3.0-3.1 forward-equivalents, of which the forward and backward (with the
per-head products) ~2.4 and the contractions with the sources ~0.6.
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


class _SharedProjection(torch.autograd.Function):
    """Identity on a projection's output ``q [batch, pos, head, d_head]``, which the
    attention computed from a detached copy of its input. The backward writes each head's
    ``y'[h] = (g[h] / scale) @ (W[h] * w)^T`` (the destination's gradient before the layer
    norm's centring, see :func:`_pairs_impl`) into ``out [head, batch * pos, d_model]`` and
    passes ``scale * sum_h y'[h]`` to ``xhat``, the layer norm's normalised value (without
    a layer norm: ``sum_h g[h] @ W[h]^T`` to the input): what the projection's own backward
    and the gain's would compute, so each product is formed once."""

    @staticmethod
    def forward(
        ctx: Any,
        xhat: Tensor,
        q: Tensor,
        w: Tensor,
        scale: Tensor | None,
        out: Tensor,
        keep: dict,
        key: str,
    ) -> Tensor:
        ctx.w, ctx.scale, ctx.out, ctx.keep, ctx.key = w, scale, out, keep, key
        return q.view_as(q)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple:
        b, p, h, e = g.shape
        ctx.keep[ctx.key] = g
        gh = g.permute(2, 0, 1, 3)
        if ctx.scale is not None:
            gh = gh / ctx.scale
        torch.bmm(gh.reshape(h, b * p, e), ctx.w.transpose(1, 2), out=ctx.out)
        grad = ctx.out.sum(0).view(b, p, -1)
        if ctx.scale is not None:
            grad = grad * ctx.scale
        return grad, None, None, None, None, None, None


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
        if graph.has_mlp:
            grad_keys.append(f"blocks.{layer}.hook_mlp_in")
    grad_keys.append(f"blocks.{n_layers - 1}.hook_resid_post")
    keep_keys = ["hook_embed", "hook_pos_embed"]
    for layer in range(n_layers):
        # each head's output, which the forward then forms per head and sums
        keep_keys += [f"blocks.{layer}.attn.hook_result"]
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

    # Each attention reads a detached copy of its input; q, k and v are routed back to the
    # layer norm's normalised value (or the input) through _SharedProjection, whose
    # backward writes the per-head products into ys[layer].
    n_h = cfg.n_heads
    b, p = item.tokens.shape
    n_col = 3 * n_h + (1 if graph.has_mlp else 0) + 1
    dtype = model.blocks[0].attn.W_Q.dtype
    ys = [
        torch.empty(n_col, b * p, cfg.d_model, dtype=dtype, device=item.tokens.device)
        for _ in range(n_layers)
    ]
    targets: list[Tensor] = []

    def target(act: Tensor) -> Tensor:
        if not act.requires_grad:  # nothing upstream needs a gradient: a probe to carry it
            act = act + torch.zeros_like(act, requires_grad=True)
        targets.append(act)
        return act

    def normalized(key: str) -> Any:
        def fn(act: Tensor) -> Tensor:
            acts[key] = act.detach()
            return target(act)

        return fn

    def attn_input(act: Tensor) -> Tensor:
        if not has_ln:
            target(act)
        return act.detach()

    def share(layer: int, c: int, weight: Tensor) -> Any:
        key = f"blocks.{layer}.attn.hook_{'qkv'[c]}"
        ln = model.blocks[layer].ln1
        w = weight.detach() * ln.w.detach()[:, None] if has_ln else weight.detach()

        def fn(act: Tensor) -> Tensor:
            acts[key] = act.detach()
            scale = (
                acts[f"blocks.{layer}.ln1.hook_scale"].permute(2, 0, 1)[..., None]
                if has_ln
                else None
            )
            out = ys[layer][c * n_h : (c + 1) * n_h]
            return _SharedProjection.apply(targets[-1], act, w, scale, out, shared, key)

        return fn

    shared: dict[str, Tensor] = {}
    hooks = {k: keep(k) for k in keep_keys}
    hooks.update({k: tap(k) for k in grad_keys})
    for layer in range(n_layers):
        attn = model.blocks[layer].attn
        hooks[f"blocks.{layer}.hook_attn_in"] = attn_input
        if has_ln:
            key = f"blocks.{layer}.ln1.hook_normalized"
            hooks[key] = normalized(key)
        for c, w in enumerate((attn.W_Q, attn.W_K, attn.W_V)):
            hooks[f"blocks.{layer}.attn.hook_{'qkv'[c]}"] = share(layer, c, w)
    with torch.inference_mode(False), torch.enable_grad(), _hooks_on(model, hooks):
        logits = model(item.tokens, item.mask)
        value = metric(logits, item.batch, item.clean)
        # the attention inputs are asked for so that every layer's backward runs
        inputs = [zs[k] for k in grad_keys] + targets
        grads = dict(zip(grad_keys, torch.autograd.grad(value.sum(), inputs)))
    grads.update(shared)
    grads["ys"] = ys
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
        result = acts[f"blocks.{layer}.attn.hook_result"].permute(2, 0, 1, 3)
        torch.sub(ablated[i : i + n_h], result, out=delta[i : i + n_h])
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
        y = grads["ys"][layer]  # y' = (g @ W^T) * w / scale, formed by the backward
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
