"""Exact edge sweep: the effect of ablating every edge alone.

An edge ablation changes one destination's input and nothing upstream of it, so the clean
run is reused: the destination is recomputed from its changed input (one head with its
query, key or value input changed; one MLP; or the unembedding), its output change is
added to the clean stream, and only the blocks after it run — with logits only at the
positions the metric reads. Edges into one destination share stacked forwards.
This equals :class:`~meanablate.discovery.edges.EdgeData` with the one edge ablated
(to float error), which the tests check. Hugging Face Llama-style and NeoX models do the
same with their own pieces (:mod:`~meanablate.discovery.edge_hf`): one head recomputed
(with grouped-query attention, its own copy of the shared key/value head), the rest of
its block finished from the clean run, then the family's forward resumed after that
block. A family without per-head pieces resumes its edge forward at the destination's
layer, one edge at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from meanablate.discovery import fastpath
from meanablate.discovery.edge_forward import OursEdges
from meanablate.discovery.edges import EdgeData
from meanablate.discovery.graph import Edge, check_edge_names
from meanablate.discovery.scores import Scores
from meanablate.discovery.source import Source
from meanablate.discovery.sweep import restrict_positions
from meanablate.metrics import Metric, get_metric

__all__ = ["MAX_SWEEP_EDGES", "edge_sweep"]

# Beyond this many edges an exact sweep is hours on a CPU: we ask for EAP instead.
MAX_SWEEP_EDGES = 50_000


def edge_sweep(
    model: nn.Module,
    batches: Iterable[Any] | EdgeData,
    source: Source | str = "mean",
    *,
    edges: Sequence[str] | None = None,
    metric: str | Metric = "kl",
    split_qkv: bool = True,
    stack: int = 1,
    max_edges: int = MAX_SWEEP_EDGES,
) -> Scores:
    """Every edge ablated alone, exactly: :class:`Scores` over edge names.

    ``values [n_edges]`` mean effects, ``per_example [n_edges, n_examples]`` (effects as
    in :func:`~meanablate.discovery.sweep.sweep`: the distance for ``kl``/``l2``, the change
    for task metrics). ``stack``: edges into one destination per forward (1, the default,
    is fastest on a CPU; more can pay on a GPU; a family without per-head pieces runs one
    edge at a time).

    >>> from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
    >>> cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=1, d_head=4, d_vocab=5, n_ctx=4)
    >>> batch = {"tokens": torch.tensor([[1, 2, 3]])}
    >>> edge_sweep(HookedTransformer(cfg), [batch], "zero").units[:2]
    ['input->a0.h0<q>', 'input->a0.h0<k>']
    """
    m = get_metric(metric)
    data = (
        batches
        if isinstance(batches, EdgeData)
        else EdgeData(model, batches, source, split_qkv=split_qkv)
    )
    graph = data.graph
    chosen = (
        graph.edges if edges is None else [graph.edges[i] for i in check_edge_names(graph, edges)]
    )
    if not chosen:
        raise ValueError("edges must name at least one edge")
    if len(chosen) > max_edges:
        raise ValueError(
            f"an exact sweep over {len(chosen)} edges is {len(chosen)} downstream forwards "
            f"per batch (more than max_edges={max_edges}); rank them with eap() (one forward "
            "and one backward) or eap_ig(), verify the top ones with edge_sweep(edges=...), "
            "or raise max_edges"
        )
    if stack < 1:
        raise ValueError(f"stack must be >= 1, got {stack}")
    t0 = time.perf_counter()
    by_dst: dict[int, list[Edge]] = {}
    for e in chosen:
        by_dst.setdefault(e.dst_index, []).append(e)
    rows: dict[int, list[Tensor]] = {e.index: [] for e in chosen}
    ours = isinstance(data.family, OursEdges)
    with torch.inference_mode():
        for item in data.items:
            if ours:
                _sweep_item(data, item, by_dst, m, stack, rows)
            elif hasattr(data.family, "attend"):
                _sweep_item_heads(data, item, by_dst, m, stack, rows)
            else:
                _sweep_item_resumed(data, item, by_dst, m, rows)
    per_example = torch.stack([torch.cat(rows[e.index]) for e in chosen])
    return Scores.from_examples(
        [e.name for e in chosen], per_example, m.name, "sweep", time.perf_counter() - t0
    )


def _sweep_item(data: EdgeData, item: Any, by_dst: dict, m: Metric, stack: int, rows: dict) -> None:
    fam, graph, model = data.family, data.graph, data.family.model
    key = ("sweep clean run", id(item))
    if key not in data.cache:  # kept on the data: sweeps over a few edges at a time
        data.cache[key] = fam.run(graph, item.tokens, item.mask, keep_outs=True, record_inputs=True)
    run = data.cache[key]
    outs, inputs = run.outs, run.inputs
    assert outs is not None and inputs is not None
    positions, sub = restrict_positions(item.batch, run.logits)
    clean = run.logits if positions is None else run.logits[:, positions]
    effect_of = m.bind(sub, clean)
    b = item.tokens.shape[0]
    n_layers = fam.cfg.n_layers
    has_mlp = graph.has_mlp
    ablated = item.ablated
    qkv_cache: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def resid_before(layer: int) -> Tensor:
        if layer < n_layers:
            return inputs[graph.dsts[_first_dst(graph, layer)]]
        return inputs["logits"]

    for d, group in by_dst.items():
        dst = graph.dsts[d]
        layer = graph.dst_layer[d]
        for start in range(0, len(group), stack):
            chunk = group[start : start + stack]
            k = len(chunk)
            delta = torch.cat(
                [(ablated[e.src_index] - outs[e.src_index]).expand_as(outs[0]) for e in chunk]
            )
            mask = item.mask.repeat(k, 1) if item.mask is not None else None
            x = inputs[dst].repeat(k, 1, 1) + delta
            if dst == "logits":
                xs = x if positions is None else x[:, positions]
                logits = model.unembed(xs)
            else:
                if dst.startswith("m"):
                    node = graph.src_index(dst)
                    change = fam.mlp(layer, x) - outs[node].repeat(k, 1, 1)
                    resid = resid_before(layer + 1).repeat(k, 1, 1) + change
                    start_layer = layer + 1
                else:
                    e0 = chunk[0]
                    node = graph.src_index(e0.dst)
                    head = graph.srcs[node].head
                    if layer not in qkv_cache:
                        qkv_cache[layer] = _clean_qkv(fam, layer, inputs[graph.dsts[d]])
                    change = _one_head(fam, layer, head, x, e0.qkv, qkv_cache[layer], mask, k)
                    change = change - outs[node].repeat(k, 1, 1)
                    if has_mlp:
                        mid = inputs[f"m{layer}"].repeat(k, 1, 1) + change
                        resid = fastpath.finish_block_from_mid(model.blocks[layer], mid)
                    else:
                        resid = resid_before(layer + 1).repeat(k, 1, 1) + change
                    start_layer = layer + 1
                logits = fastpath.run_downstream(model, resid, start_layer, mask, positions)
            for i, e in enumerate(chunk):
                rows[e.index].append(effect_of(logits[i * b : (i + 1) * b]).double().cpu())


def _sweep_item_resumed(data: EdgeData, item: Any, by_dst: dict, m: Metric, rows: dict) -> None:
    """Any family: each edge's run resumes at its destination's layer from the clean run's
    saved stream, with only that destination's input changed (its clean input plus the
    edge's change; everything upstream of it is clean)."""
    fam, graph = data.family, data.graph
    states: list = []
    run = fam.run(graph, item.tokens, item.mask, keep_outs=True, record_inputs=True, states=states)
    outs, inputs = run.outs, run.inputs
    assert outs is not None and inputs is not None
    positions, sub = restrict_positions(item.batch, run.logits)
    clean = run.logits if positions is None else run.logits[:, positions]
    effect_of = m.bind(sub, clean)
    for d, group in by_dst.items():
        start = states[graph.dst_layer[d]]
        for e in group:
            x = inputs[graph.dsts[d]] + (item.ablated[e.src_index] - outs[e.src_index])
            logits = fam.run(graph, item.tokens, item.mask, in_override={d: x}, start=start).logits
            logits = logits if positions is None else logits[:, positions]
            rows[e.index].append(effect_of(logits).double().cpu())


def _sweep_item_heads(
    data: EdgeData, item: Any, by_dst: dict, m: Metric, stack: int, rows: dict
) -> None:
    """Llama-style and NeoX: only the destination is recomputed (one head from its changed
    input and the other inputs' clean projections, an MLP, or the unembedding), its output
    change is added to the clean stream (a sequential block then reruns its MLP), and the
    family's forward resumes at the next block. ``stack`` edges into one destination share
    a run (their copies stacked along the batch)."""
    fam, graph = data.family, data.graph
    key = ("sweep clean run with states", id(item))
    if key not in data.cache:  # kept on the data: sweeps over a few edges at a time
        states: list = []
        run = fam.run(
            graph, item.tokens, item.mask, keep_outs=True, record_inputs=True, states=states
        )
        data.cache[key] = (run, states)
    run, states = data.cache[key]
    outs, inputs = run.outs, run.inputs
    assert outs is not None and inputs is not None
    positions, sub = restrict_positions(item.batch, run.logits)
    clean = run.logits if positions is None else run.logits[:, positions]
    effect_of = m.bind(sub, clean)
    b = item.tokens.shape[0]
    qkv_cache: dict[int, tuple] = {}
    for d, group in by_dst.items():
        dst = graph.dsts[d]
        layer = graph.dst_layer[d]
        for first in range(0, len(group), stack):
            chunk = group[first : first + stack]
            k = len(chunk)
            delta = torch.cat(
                [(item.ablated[e.src_index] - outs[e.src_index]).expand_as(outs[0]) for e in chunk]
            )
            x = inputs[dst].repeat(k, 1, 1) + delta
            mask = item.mask.repeat(k, 1) if item.mask is not None else None
            if dst == "logits":
                logits = fam.unembed(x if positions is None else x[:, positions])
            else:
                node = graph.src_index(chunk[0].dst)
                after = states[layer + 1]  # (layer + 1, clean outputs so far, clean stream)
                if dst.startswith("m"):
                    change = fam.mlp(layer, x) - outs[node].repeat(k, 1, 1)
                    resid = after[2].repeat(k, 1, 1) + change
                else:
                    head = graph.srcs[node].head
                    new = _hf_head(fam, layer, head, x, chunk[0].qkv, qkv_cache, inputs[dst], mask)
                    change = new - outs[node].repeat(k, 1, 1)
                    if fam.parallel:  # the MLP read the block's input: unchanged
                        resid = after[2].repeat(k, 1, 1) + change
                    else:
                        mid = inputs[f"m{layer}"].repeat(k, 1, 1) + change
                        resid = mid + fam.mlp(layer, mid)
                logits = fam.run(
                    graph, item.tokens, mask, start=(layer + 1, after[1], resid)
                ).logits
                logits = logits if positions is None else logits[:, positions]
            for i, e in enumerate(chunk):
                rows[e.index].append(effect_of(logits[i * b : (i + 1) * b]).double().cpu())


def _hf_head(
    fam: Any,
    layer: int,
    head: int,
    x: Tensor,
    qkv: str | None,
    cache: dict,
    clean_in: Tensor,
    mask: Tensor | None,
) -> Tensor:
    """Head ``head``'s output ``[k * batch, pos, d_model]`` with its ``qkv`` input ``x``
    (all three with ``qkv=None``); its other inputs' projections are the clean run's
    (every head read the block's input ``clean_in [batch, pos, d_model]`` there)."""
    if layer not in cache:
        parts = fam._qkv(layer)
        xin = clean_in.unsqueeze(2).expand(*clean_in.shape[:2], fam.cfg.n_heads, -1)
        cache[layer] = (parts, [fam.project(layer, c, xin, slice(None), parts) for c in "qkv"])
    parts, clean = cache[layer]
    h = slice(head, head + 1)
    k = x.shape[0] // clean_in.shape[0]
    qkv_in = [
        fam.project(layer, c, x.unsqueeze(2), h, parts)
        if qkv in (c, None)
        else (clean[i][:, :, h].repeat(k, 1, 1, 1) if k > 1 else clean[i][:, :, h])
        for i, c in enumerate("qkv")
    ]
    return fam.attend(layer, *qkv_in, mask, h)[0]


def _first_dst(graph: Any, layer: int) -> int:
    return graph.dst_layer.index(layer)


def _clean_qkv(fam: Any, layer: int, resid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every head's clean query, key and value ``[batch, pos, head, d_head]``."""
    block = fam.model.blocks[layer]
    attn = block.attn
    x = block.ln1(resid)
    return (
        torch.einsum("bpd,hde->bphe", x, attn.W_Q) + attn.b_Q,
        torch.einsum("bpd,hde->bphe", x, attn.W_K) + attn.b_K,
        torch.einsum("bpd,hde->bphe", x, attn.W_V) + attn.b_V,
    )


def _one_head(
    fam: Any,
    layer: int,
    head: int,
    x: Tensor,
    qkv: str | None,
    clean: tuple[Tensor, Tensor, Tensor],
    mask: Tensor | None,
    k: int,
) -> Tensor:
    """Head ``head``'s output ``[k * batch, pos, d_model]`` with its ``qkv`` input ``x``
    (all three with ``qkv=None``); the other inputs' projections come from ``clean``."""
    block = fam.model.blocks[layer]
    attn = block.attn
    h = slice(head, head + 1)
    xn = block.ln1(x)
    out = []
    for name, w, b, c in zip(
        "qkv", (attn.W_Q, attn.W_K, attn.W_V), (attn.b_Q, attn.b_K, attn.b_V), clean
    ):
        if qkv in (name, None):
            out.append(torch.einsum("bpd,hde->bphe", xn, w[h]) + b[h])
        else:
            out.append(c[:, :, h].repeat(k, 1, 1, 1) if k > 1 else c[:, :, h])
    z = fam._attend(*out, mask)
    return torch.einsum("bphe,hed->bpd", z, attn.W_O[h])
