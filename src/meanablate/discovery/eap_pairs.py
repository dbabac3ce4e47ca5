"""EAP's contraction: every destination's gradient with every earlier source's change.

:func:`~meanablate.discovery.eap_fast.clean_pair_scores` records, per layer, each
destination's gradient before its layer norm's centring and the centring's means
(:class:`EapRecord`); :func:`pair_scores` contracts them with the sources' changes
``ablated - clean`` (no graph).

A destination reading through a layer norm has input gradient ``J y`` with
``y = (g @ W^T) * w`` (``g``: the gradient at its projection, ``w``: the gain) and
``J y = (y - mean(y) - xhat * mean(y * xhat)) / scale`` per position. Rather than apply
``J`` to every destination's ``[batch, pos, d_model]`` gradient (several passes over
each), the score ``sum_{p,d} delta * J y`` is expanded: with ``y' = y / scale`` it is
``sum_p [<delta, y'> - sum_d(delta) mean(y') - <delta, xhat> mean(y' * xhat)]``; the
means come from the backward, ``sum_d(delta)`` and ``<delta, xhat>`` for every source and
layer norm from one batched product. Each layer's destinations are contracted only with
the sources before them: the heads' q/k/v with those before the layer, the MLP with
those before it (its own layer's heads too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["EapRecord", "pair_scores"]


@dataclass
class EapRecord:
    """Per layer: ``ys [q|k|v x head, MLP, (logits), batch * pos, d_model]``, the
    destinations' gradients before the centring (the logits' after it: ``ln_final`` has
    no source after it); ``ms [2, batch, pos, q|k|v, head]``, the heads' ``mean(y')`` and
    ``d * mean(y' * xhat)``; ``mlp_means``: layer -> the MLP's ``mean(y')`` and
    ``mean(y' * xhat)`` ``[batch, pos, 1]`` (with layer norms)."""

    ys: list[Tensor]
    ms: list[Tensor]
    mlp_means: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


def _deltas(data: Any, item: Any, acts: dict) -> Tensor:
    """Every node's change ``ablated - clean``, source-major ``[n_src, batch, pos, d]``."""
    graph, model, cfg = data.graph, data.family.model, data.family.cfg
    n_h, d = cfg.n_heads, cfg.d_model
    b, p = item.tokens.shape
    ablated = item.ablated
    delta = ablated.new_empty(len(graph.srcs), b, p, d)
    torch.sub(ablated[0], acts["hook_embed"] + acts["hook_pos_embed"], out=delta[0])
    i = 1
    for layer in range(cfg.n_layers):
        # each head's output z[h] @ W_O[h], subtracted from the ablated value in one product
        z = acts[f"blocks.{layer}.attn.hook_z"].permute(2, 0, 1, 3).reshape(n_h, b * p, -1)
        abl = ablated[i : i + n_h].expand(n_h, b, p, d).reshape(n_h, -1, d)
        out = delta[i : i + n_h].view(n_h, b * p, d)
        torch.baddbmm(abl, z, model.blocks[layer].attn.W_O, alpha=-1, out=out)
        i += n_h
        if graph.has_mlp:
            torch.sub(ablated[i], acts[f"blocks.{layer}.hook_mlp_out"], out=delta[i])
            i += 1
    return delta


def pair_scores(data: Any, item: Any, acts: dict, rec: EapRecord, has_ln: bool) -> Tensor:
    """``[n_src, n_dst, batch]``: every (source, destination) pair's EAP score."""
    graph, cfg = data.graph, data.family.cfg
    n_layers, n_h = cfg.n_layers, cfg.n_heads
    b, p = item.tokens.shape
    d = cfg.d_model
    n_src, n_dst = len(graph.srcs), len(graph.dsts)
    m = 1 if graph.has_mlp else 0
    delta = _deltas(data, item, acts)
    flat = delta.view(n_src, b, p * d).transpose(0, 1)  # [batch, n_src, pos * d]
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
    n_q = 3 * n_h  # this layer's head destinations: q, k, v of each head
    d0 = 0
    for layer in range(n_layers):
        ns = 1 + layer * (n_h + m)  # sources before this layer's attention
        y = rec.ys[layer].view(-1, b, p * d)
        last = layer == n_layers - 1
        # <delta, y'> summed over positions and d_model, [batch, sources, destinations]:
        # the heads with the sources before the layer; the MLP (and the logits) with
        # those before it (every source), apart: one product would waste a third
        heads = torch.bmm(y[:n_q].transpose(0, 1), flat[:, :ns].transpose(1, 2))
        heads = heads.transpose(1, 2)
        n_rest = m + int(last)
        rest = None
        if n_rest:
            nr = n_src if last else ns + n_h
            rest = torch.bmm(y[n_q : n_q + n_rest].transpose(0, 1), flat[:, :nr].transpose(1, 2))
            rest = rest.transpose(1, 2)  # [batch, nr, MLP | logits]
        if has_ln:
            m1, m2 = rec.ms[layer].view(2, b, p, n_q)  # columns (q|k|v, head)
            i1 = ln_index[f"blocks.{layer}.ln1"]
            heads -= torch.bmm(st[0, :, :ns], m1)
            heads -= torch.bmm(st[i1, :, :ns], m2 / d)
            if m:
                assert rest is not None
                s1, s2 = rec.mlp_means[layer]
                i2 = ln_index[f"blocks.{layer}.ln2"]
                nm = ns + n_h  # the sources the MLP reads
                rest[:, :nm, 0] -= torch.bmm(st[0, :, :nm], s1)[..., 0]
                rest[:, :nm, 0] -= torch.bmm(st[i2, :, :nm], s2)[..., 0]
        # columns are (q|k|v, head); the graph's destinations are (head, q|k|v) or
        # (head) with q, k and v summed
        attn_cols = heads.reshape(b, ns, 3, n_h)
        if per == 3:
            out[:, :ns, d0 : d0 + n_q] = attn_cols.transpose(2, 3).reshape(b, ns, n_q)
        else:
            out[:, :ns, d0 : d0 + n_h] = attn_cols.sum(2)
        d0 += n_h * per
        if m:
            assert rest is not None
            nm = ns + n_h
            out[:, :nm, d0] = rest[:, :nm, 0]
            d0 += 1
        if last:
            assert rest is not None
            out[:, :, d0] = rest[:, :, m]
    return out.permute(1, 2, 0)
