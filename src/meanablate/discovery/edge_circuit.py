"""A circuit's metric from the nodes it keeps alive: the pruning searches' evaluations.

With every edge outside the circuit ablated, a destination's input is
``A + sum over its kept edges (out_src - ablated_src)``, where ``A`` (the sum of every
earlier source's ablated value and the stream's constants, ``b_O``) depends on the read
point only, not on the run. So only nodes with a kept outgoing edge matter; of those, a
node with no kept incoming edge outputs what it outputs on ``A`` alone, once per batch;
the rest are recomputed (one head, or one MLP) from their kept inputs, and the logits
from theirs. A circuit of a few dozen edges costs a fraction of the edge-masked forward
(:meth:`~meanablate.discovery.edge_forward.OursEdges.run`, which runs every destination of
every layer with its own input), and gives the same values to float rounding — so it
serves smooth metrics; for discrete ones (``accuracy``, custom argmax metrics), whose
exact ties the last bit decides, :func:`circuit_metric` answers ``None`` and the callers
run the masked forward itself; so it does for families other than our transformer and its
exact copies.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from meanablate.discovery.edge_forward import OursEdges
from meanablate.discovery.edges import EdgeData
from meanablate.metrics import Metric

__all__ = ["circuit_metric"]

_DST = re.compile(r"^a(\d+)\.h(\d+)(?:<([qkv])>)?$")


def _constants(data: EdgeData, item: Any) -> dict:
    """Per batch: the read points' ``A`` and every node's output on ``A`` alone."""
    key = ("circuit constants", id(item))
    if key in data.cache:
        return data.cache[key]
    fam, graph = data.family, data.graph
    model, cfg = fam.model, fam.cfg
    n_h, has_mlp = cfg.n_heads, graph.has_mlp
    b, p = item.tokens.shape
    ablated = item.ablated
    shape = (b, p, cfg.d_model)
    with torch.inference_mode():
        embed = model.embed(item.tokens)
        stream = ablated[0].expand(shape).clone()  # the sum of ablated sources so far
        attn_in, mlp_in, heads, mlps = [], [], [], []
        i = 1
        for layer in range(cfg.n_layers):
            attn_in.append(stream.clone())
            heads.append(_all_heads(data, layer, stream, item.mask))  # [head, b, p, d]
            stream = stream + ablated[i : i + n_h].sum(0) + model.blocks[layer].attn.b_O
            i += n_h
            if has_mlp:
                mlp_in.append(stream.clone())
                mlps.append(fam.mlp(layer, stream))
                stream = stream + ablated[i]
                i += 1
    out = {
        "embed": embed,
        "attn_in": attn_in,
        "mlp_in": mlp_in,
        "final": stream,
        "heads": heads,
        "mlps": mlps,
    }
    data.cache[key] = out
    return out


def _all_heads(data: EdgeData, layer: int, x: Tensor, mask: Tensor | None) -> Tensor:
    """Every head's output ``[head, batch, pos, d_model]`` with all inputs ``x``."""
    fam = data.family
    block = fam.model.blocks[layer]
    attn = block.attn
    xn = block.ln1(x)
    q, k, v = (
        torch.einsum("bpd,hde->bphe", xn, w) + bias
        for w, bias in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V))
    )
    return torch.einsum("bphe,hed->hbpd", fam._attend(q, k, v, mask), attn.W_O)


def _head(data: EdgeData, layer: int, h: int, xs: list[Tensor], mask: Tensor | None) -> Tensor:
    """Head ``h``'s output ``[batch, pos, d_model]`` from its q, k, v inputs ``xs``."""
    fam = data.family
    block = fam.model.blocks[layer]
    attn = block.attn
    normed: dict[int, Tensor] = {}
    proj = []
    for x, w, bias in zip(xs, (attn.W_Q, attn.W_K, attn.W_V), (attn.b_Q, attn.b_K, attn.b_V)):
        if id(x) not in normed:
            normed[id(x)] = block.ln1(x)
        proj.append((normed[id(x)] @ w[h] + bias[h]).unsqueeze(2))  # [b, p, 1, d_head]
    z = fam._attend(*proj, mask)
    return z[:, :, 0] @ attn.W_O[h]


def circuit_metric(data: EdgeData, kept: Tensor, m: Metric) -> Tensor | None:
    """``m`` per example ``[n_examples]`` with every edge outside ``kept`` (bool
    ``[n_edges]``) ablated — what ``data.metric_of(~kept, m)`` gives, to float rounding;
    ``None`` for a discrete metric (see the module docstring).

    >>> from meanablate.metrics import get_metric
    >>> from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
    >>> cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=1, d_head=4, d_vocab=5, n_ctx=4)
    >>> batch = {"tokens": torch.tensor([[1, 2, 3]]), "target": torch.tensor([[2, 3, 4]])}
    >>> data = EdgeData(HookedTransformer(cfg), [batch], "zero")
    >>> kept = torch.zeros(len(data.graph), dtype=torch.bool)
    >>> fast = circuit_metric(data, kept, get_metric("loss"))
    >>> bool(torch.allclose(fast, data.metric_of(data.graph.names, "loss")))
    True
    """
    graph, fam = data.graph, data.family
    if m.discrete or not isinstance(fam, OursEdges) or getattr(graph, "parallel", False):
        return None
    into: dict[int, list[int]] = {}
    for e in graph.edges:
        if bool(kept[e.index]):
            into.setdefault(e.dst_index, []).append(e.src_index)
    needed = sorted({s for srcs in into.values() for s in srcs})
    slots = _slots(graph)
    rows = []
    with torch.inference_mode():
        for item in data.items:
            c = _constants(data, item)
            outs: dict[int, Tensor] = {}
            change: dict[int, Tensor] = {}  # out - ablated, for the sources needed

            def read(base: Tensor, dst: int, change: dict[int, Tensor] = change) -> Tensor:
                x = base
                for s in into.get(dst, ()):
                    x = x + change[s]
                return x

            for s in needed:
                node = graph.srcs[s]
                if node.kind == "input":
                    outs[s] = c["embed"]
                elif node.kind == "head":
                    layer, h = node.layer, node.head
                    assert h is not None
                    dsts = slots[(layer, h)]
                    if any(d in into for d in dsts):
                        base = c["attn_in"][layer]
                        xs = [read(base, d) for d in dsts]
                        if len(xs) == 1:
                            xs = xs * 3
                        outs[s] = _head(data, layer, h, xs, item.mask)
                    else:
                        outs[s] = c["heads"][layer][h]
                else:
                    layer = node.layer
                    d = slots[("m", layer)][0]
                    if d in into:
                        outs[s] = fam.mlp(layer, read(c["mlp_in"][layer], d))
                    else:
                        outs[s] = c["mlps"][layer]
                change[s] = outs[s] - item.ablated[s]
            x = read(c["final"], len(graph.dsts) - 1)
            logits = fam.model.unembed(x)
            rows.append(m(logits, item.batch, item.clean).double().cpu())
    return torch.cat(rows)


def _slots(graph: Any) -> dict:
    """``(layer, head)`` -> the head's destination indices (q, k, v, or one);
    ``("m", layer)`` -> the MLP's."""
    out: dict = {}
    for i, name in enumerate(graph.dsts):
        hit = _DST.match(name)
        if hit:
            out.setdefault((int(hit.group(1)), int(hit.group(2))), []).append(i)
        elif name.startswith("m"):
            out[("m", int(name[1:]))] = [i]
    return out
