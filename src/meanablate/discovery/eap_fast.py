"""EAP at the clean run from one plain forward and one backward of the model itself.

At the clean run every head's query, key and value read the same stream, so the model's
own forward serves: one backward (activation gradients only) gives the gradient at each
head's projection (``hook_q``/``hook_k``/``hook_v``), at each MLP's input and at the
unembedding's. A destination's *input* gradient follows through the projection
(``g_q[h] @ W_Q[h]^T``) and the layer norm's vector-Jacobian product
``(g*w - mean(g*w) - xhat * mean(g*w * xhat)) / scale``.

The backward is the model's own autograd except where a destination reads the stream:
there a custom backward (:class:`_SharedProjection` at q, k and v, :class:`_NormRead` at
the MLP's and the unembedding's layer norms) forms each destination's product once,
keeps it for the contraction with the sources' changes, and passes the layer norm's
input gradient on in closed form (autograd would run a dozen ``[batch, pos, d_model]``
passes per layer norm). The layer norm's centring is never applied to a destination's
``[batch, pos, d_model]`` gradient but folded into the contraction
(:mod:`~meanablate.discovery.eap_pairs`). The forward keeps its fused output projection;
each head's output is formed afterwards from ``hook_z`` without a graph. Parameters are
taken out of autograd for the call (their gradients are never asked for); a built-in
metric's gradient at the logits is taken in closed form
(:mod:`~meanablate.discovery.logit_grad`). The tests check all of it against the masked
forward's probes and finite differences.

Cost on the benchmark model (bench_edges.py: 4 layers, d_model 256, batch 32 x 32, one
thread, 2 shared cores at load ~7): 2.6-3.0 forward-equivalents, median ~2.8 (was
3.0-3.45): the forward with autograd ~1.1, the backward with the per-head products ~1.2,
the contractions with the sources ~0.55.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from meanablate.discovery.eap_pairs import EapRecord, pair_scores
from meanablate.discovery.logit_grad import logit_grad
from meanablate.hooks import ActivationFn

__all__ = ["clean_pair_scores"]


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


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The parameters' ``requires_grad`` off, restored on exit: EAP never asks for their
    gradients, and recording them for autograd costs ~10% of a forward."""
    params = [q for q in model.parameters() if q.requires_grad]
    try:
        for q in params:
            q.requires_grad_(False)
        yield
    finally:
        for q in params:
            q.requires_grad_(True)


def _centre(y: Tensor, s1: Tensor, s2: Tensor, xhat: Tensor) -> Tensor:
    """A layer norm's input gradient ``y - s1 - xhat * s2`` from ``y = g_xhat / scale``,
    ``s1 = mean(y)`` and ``s2 = mean(y * xhat)`` (``[batch, pos, 1]``): a new tensor."""
    return torch.sub(y, s1).addcmul_(xhat, s2, value=-1)


class _SharedProjection(torch.autograd.Function):
    """Identity on a projection's output ``q [batch, pos, head, d_head]``, which the
    attention computed from a detached copy of its input; its gradient goes to ``x``, the
    stream the layer norm reads (without a layer norm: the attention's input).

    The backward writes each head's ``y'[h] = (g[h] / scale) @ (W[h] * w)^T`` (the
    destination's gradient before the layer norm's centring) into ``rec.out [head,
    batch * pos, d_model]``, the centring's means ``mean(y'[h])`` and ``d * mean(y'[h] *
    xhat)`` into ``rec.m1``/``rec.m2`` ``[batch, pos, head]`` (from ``g / scale``,
    ``d_model / d_head`` times smaller than ``y'``), and returns the layer norm's input
    gradient ``Y - mean(Y) - xhat * mean(Y * xhat)`` with ``Y = sum_h y'[h]``, whose
    means are sums of those per head: what autograd would compute through the
    projection, the gain and the layer norm, with each product formed once.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, q: Tensor, rec: Any) -> Tensor:
        ctx.rec = rec
        return q.view_as(q)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple:
        r = ctx.rec
        b, p, h, e = g.shape
        if r.scale is not None:
            g = g / r.scale  # [batch, pos, 1, 1]
            # mean_d(y') = g' . mean_d(W * w); d * mean_d(y' * xhat) = g' . (q - bias)
            torch.linalg.vecdot(g, r.wmean, out=r.m1)
            torch.linalg.vecdot(g, r.q - r.bias, out=r.m2)
        gh = g.permute(2, 0, 1, 3).reshape(h, b * p, e)
        torch.bmm(gh, r.w.transpose(1, 2), out=r.out)
        ysum = r.out.sum(0).view(b, p, -1)
        if r.scale is None:
            return ysum, None, None
        s1 = r.m1.sum(-1, keepdim=True)
        s2 = r.m2.sum(-1, keepdim=True) / ysum.shape[-1]
        return ysum.sub_(s1).addcmul_(r.xhat, s2, value=-1), None, None


class _NormRead(torch.autograd.Function):
    """Identity on a layer norm's normalised value ``xhat [batch, pos, d_model]``, its
    gradient going straight to ``x``, the layer norm's input. The backward writes
    ``y = g / scale`` into ``rec.y`` (the reader's gradient before the centring; with
    ``rec.centred`` the input gradient itself) and the centring's means into ``rec.s1``,
    ``rec.s2``, and returns the input gradient ``y - mean(y) - xhat * mean(y * xhat)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, xhat: Tensor, rec: Any) -> Tensor:
        ctx.rec = rec
        return xhat.view_as(xhat)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple:
        r = ctx.rec
        y = torch.div(g, r.scale, out=r.y)
        r.s1 = y.mean(-1, keepdim=True)
        r.s2 = torch.linalg.vecdot(y, r.xhat)[..., None] / y.shape[-1]
        dx = _centre(y, r.s1, r.s2, r.xhat)
        if r.centred:
            r.y.copy_(dx)
        return dx, None, None


class _Rec:
    """What one custom backward reads and writes (a plain namespace)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def clean_pair_scores(data: Any, item: Any, metric: Any) -> Tensor:
    """``[n_src, n_dst, batch]``: EAP's ``(ablated_src - out_src) . d metric / d input_dst``
    at the clean run, for every (source, destination) pair."""
    model, cfg, graph = data.family.model, data.family.cfg, data.graph
    n_layers, n_h, d = cfg.n_layers, cfg.n_heads, cfg.d_model
    has_ln = not isinstance(model.blocks[0].ln1, nn.Identity)
    mlp = graph.has_mlp
    last = n_layers - 1
    b, p = item.tokens.shape
    n_col = 3 * n_h + (1 if mlp else 0) + 1
    dtype = model.blocks[0].attn.W_Q.dtype
    dev = item.tokens.device
    # per layer: the destinations' gradients [q|k|v x head, MLP, (logits)] and, with layer
    # norms, the centring's means of the heads' ([2, batch, pos, q|k|v, head])
    rec = EapRecord(
        ys=[torch.empty(n_col, b * p, d, dtype=dtype, device=dev) for _ in range(n_layers)],
        ms=[torch.empty(2, b, p, 3, n_h, dtype=dtype, device=dev) for _ in range(n_layers)],
    )
    acts: dict[str, Tensor] = {}
    streams: dict[str, Tensor] = {}  # what each layer norm (or attention) reads
    leaves: list[Tensor] = []
    taps: dict[str, Tensor] = {}
    mlp_recs: dict[int, _Rec] = {}

    def keep(key: str) -> Any:
        def fn(act: Tensor) -> None:
            acts[key] = act.detach()

        return fn

    def stream(key: str) -> Any:
        def fn(act: Tensor) -> Tensor | None:
            if key == "blocks.0.hook_resid_pre":  # nothing upstream needs a gradient
                act = act.detach().requires_grad_(True)
                leaves.append(act)
            streams[key] = act
            return act

        return fn

    def attn_input(act: Tensor) -> Tensor:
        return act.detach()

    def share(layer: int, c: int) -> Any:
        block = model.blocks[layer]
        attn = block.attn
        weight = (attn.W_Q, attn.W_K, attn.W_V)[c].detach()  # [head, d_model, d_head]
        out = rec.ys[layer][c * n_h : (c + 1) * n_h]
        if not has_ln:
            r = _Rec(w=weight, scale=None, out=out)
        else:
            w = weight * block.ln1.w.detach()[:, None]
            # the projection less its biases is (xhat * w) @ W: ln1's bias through W too
            bias = (attn.b_Q, attn.b_K, attn.b_V)[c].detach()
            bias = bias + torch.einsum("d,hde->he", block.ln1.b.detach(), weight)
            m = rec.ms[layer]
            r = _Rec(w=w, out=out, m1=m[0, :, :, c], m2=m[1, :, :, c], wmean=w.mean(1), bias=bias)

        def fn(act: Tensor) -> Tensor:
            if has_ln:
                r.scale = acts[f"blocks.{layer}.ln1.hook_scale"][..., None]
                r.xhat = acts[f"blocks.{layer}.ln1.hook_normalized"]
                r.q = act.detach()
            return _SharedProjection.apply(streams[f"blocks.{layer}.hook_resid_pre"], act, r)

        return fn

    def norm_read(layer: int | None) -> Any:
        """At ``ln2`` of ``layer`` (the MLP's input) or, for ``None``, ``ln_final``."""
        prefix = "ln_final" if layer is None else f"blocks.{layer}.ln2"
        src = f"blocks.{last}.hook_resid_post" if layer is None else f"{prefix[:-4]}.hook_resid_mid"
        y = rec.ys[last][n_col - 1] if layer is None else rec.ys[layer][3 * n_h]
        r = _Rec(y=y.view(b, p, d), centred=layer is None)
        if layer is not None:
            mlp_recs[layer] = r

        def fn(act: Tensor) -> Tensor:
            r.xhat = acts[f"{prefix}.hook_normalized"] = act.detach()
            r.scale = acts[f"{prefix}.hook_scale"]
            return _NormRead.apply(streams[src], act, r)

        return fn

    def tap(key: str) -> Any:  # without layer norms: a probe on the stream a reader reads
        def fn(act: Tensor) -> Tensor:
            taps[key] = torch.zeros_like(act, requires_grad=True)
            return act + taps[key]

        return fn

    hooks: dict[str, ActivationFn] = {"hook_embed": keep("hook_embed")}
    hooks["hook_pos_embed"] = keep("hook_pos_embed")
    for layer in range(n_layers):
        pre = f"blocks.{layer}"
        hooks[f"{pre}.hook_resid_pre"] = stream(f"{pre}.hook_resid_pre")
        hooks[f"{pre}.hook_attn_in"] = attn_input
        hooks[f"{pre}.attn.hook_z"] = keep(f"{pre}.attn.hook_z")
        for c in range(3):
            hooks[f"{pre}.attn.hook_{'qkv'[c]}"] = share(layer, c)
        if mlp:
            hooks[f"{pre}.hook_mlp_out"] = keep(f"{pre}.hook_mlp_out")
        if has_ln:
            for j in (1, 2)[: 1 + int(mlp)]:
                hooks[f"{pre}.ln{j}.hook_scale"] = keep(f"{pre}.ln{j}.hook_scale")
            hooks[f"{pre}.ln1.hook_normalized"] = keep(f"{pre}.ln1.hook_normalized")
            if mlp:
                hooks[f"{pre}.hook_resid_mid"] = stream(f"{pre}.hook_resid_mid")
                hooks[f"{pre}.ln2.hook_normalized"] = norm_read(layer)
        elif mlp:
            hooks[f"{pre}.hook_mlp_in"] = tap(f"{pre}.hook_mlp_in")
    if has_ln:
        hooks[f"blocks.{last}.hook_resid_post"] = stream(f"blocks.{last}.hook_resid_post")
        hooks["ln_final.hook_scale"] = keep("ln_final.hook_scale")
        hooks["ln_final.hook_normalized"] = norm_read(None)
    else:
        hooks[f"blocks.{last}.hook_resid_post"] = tap("final")
    with torch.inference_mode(False), torch.enable_grad(), _frozen(model), _hooks_on(model, hooks):
        logits = model(item.tokens, item.mask)
        # every custom backward lies between the logits and the first block's input
        inputs = leaves + list(taps.values())
        g_logits = logit_grad(metric, logits, item.batch, item.clean)
        if g_logits is not None:  # a built-in metric: its gradient in closed form
            grads = torch.autograd.grad(logits, inputs, g_logits)
        else:
            value = metric(logits, item.batch, item.clean)
            grads = torch.autograd.grad(value.sum(), inputs)
    for key, g in zip(taps, grads[len(leaves) :]):
        if key == "final":
            rec.ys[last][n_col - 1].copy_(g.view(b * p, d))
        else:
            rec.ys[int(key.split(".")[1])][3 * n_h].copy_(g.view(b * p, d))
    rec.mlp_means = {k: (r.s1, r.s2) for k, r in mlp_recs.items()}
    with torch.no_grad():
        return pair_scores(data, item, acts, rec, has_ln)
