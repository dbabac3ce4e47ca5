"""Edge attribution patching: EAP and EAP-IG, every edge from one forward and one backward.

EAP (Syed, Rager & Conmy 2023) estimates an edge's effect to first order:
``(ablated_src - out_src) . d metric / d input_dst``, summed over positions, per example.
One forward records every node's output and, through zero probes added to every
destination's input, one backward gives every ``d metric / d input_dst``; the products for
all (source, destination) pairs are one contraction.

EAP-IG (Hanna, Pezzelle & Belinkov 2024) integrates that gradient along the path from the
clean run to the ablated one. We integrate over the edge masks, all edges moving together
from 0 (clean) to 1 (ablated) in ``steps`` right-Riemann steps (``alpha = i / steps``),
as auto-circuit's mask-gradient scores with integrated-gradient samples do; each step's
score is ``(ablated_src - out_src(alpha)) . d metric / d input_dst (alpha)``, which is the
derivative of the metric with respect to that edge's mask. Unlike plain EAP this works for
comparing metrics (``kl``, ``l2``), whose gradient vanishes at the clean run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from meanablate.discovery.eap_fast import clean_pair_scores
from meanablate.discovery.edge_forward import OursEdges
from meanablate.discovery.edges import EdgeData
from meanablate.discovery.fastpath import any_hooks
from meanablate.discovery.scores import Scores
from meanablate.discovery.source import Source
from meanablate.metrics import Metric, get_metric

__all__ = ["eap", "eap_ig"]


def eap(
    model: nn.Module,
    batches: Iterable[Any] | EdgeData,
    source: Source | str = "mean",
    *,
    metric: str | Metric = "loss",
    split_qkv: bool = True,
    fast: bool = True,
) -> Scores:
    """First-order estimates of every edge's effect: :class:`Scores` (``exact`` False).

    ``metric``: a task metric (``loss``, ``logit_diff``, ``prob``, ``mse``, or your own);
    the estimate is of ``metric(ablated) - metric(clean)``. Comparing metrics (``kl``,
    ``l2``) have zero gradient at the clean run: use :func:`eap_ig` for them.
    ``fast``: take the gradients from the model's own forward and backward
    (:mod:`~meanablate.discovery.eap_fast`; the same numbers to float rounding, about
    half the time; our transformer and its exact copies only, other families use the
    masked forward).

    >>> from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
    >>> cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=1, d_head=4, d_vocab=5, n_ctx=4)
    >>> batch = {"tokens": torch.tensor([[1, 2, 3]]), "target": torch.tensor([[2, 3, 4]])}
    >>> eap(HookedTransformer(cfg), [batch], "zero").values.shape
    torch.Size([5])
    """
    m = get_metric(metric)
    if m.compares:
        raise ValueError(
            f"metric {m.name!r} compares with the clean output, so its gradient at the clean "
            "run is zero and EAP would score every edge 0; use a task metric (loss, "
            "logit_diff, prob, mse) or eap_ig(), which integrates away from the clean run"
        )
    return _attribute(model, batches, source, m, split_qkv, [0.0], "eap", fast)


def eap_ig(
    model: nn.Module,
    batches: Iterable[Any] | EdgeData,
    source: Source | str = "mean",
    *,
    metric: str | Metric = "loss",
    steps: int = 5,
    split_qkv: bool = True,
) -> Scores:
    """Integrated-gradient estimates of every edge's effect (``steps`` forwards and
    backwards per batch); see the module docstring for the path.

    >>> from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
    >>> cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=1, d_head=4, d_vocab=5, n_ctx=4)
    >>> eap_ig(HookedTransformer(cfg), [torch.tensor([[1, 2, 3]])], "zero", metric="kl").method
    'eap_ig'
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    m = get_metric(metric)
    alphas = [i / steps for i in range(1, steps + 1)]
    return _attribute(model, batches, source, m, split_qkv, alphas, "eap_ig", False)


def _attribute(
    model: nn.Module,
    batches: Any,
    source: Any,
    m: Metric,
    split_qkv: bool,
    alphas: list[float],
    method: str,
    fast: bool,
) -> Scores:
    t0 = time.perf_counter()
    data = (
        batches
        if isinstance(batches, EdgeData)
        else EdgeData(model, batches, source, split_qkv=split_qkv)
    )
    graph = data.graph
    src = torch.tensor([e.src_index for e in graph.edges])
    dst = torch.tensor([e.dst_index for e in graph.edges])
    cols: list[Tensor] = []
    use_fast = (
        fast
        and alphas == [0.0]
        and isinstance(data.family, OursEdges)
        and not any_hooks(data.model)
    )
    for item in data.items:
        if use_fast:
            cols.append(clean_pair_scores(data, item, m)[src, dst].double().cpu())
            continue
        total: Tensor | None = None
        for alpha in alphas:
            pair = _pair_scores(data, item, m, alpha)  # [n_src, n_dst, batch]
            total = pair if total is None else total + pair
        assert total is not None
        cols.append((total / len(alphas))[src, dst].double().cpu())
    per_example = torch.cat(cols, dim=1)
    scores = Scores.from_examples(
        graph.names, per_example, m.name, method, time.perf_counter() - t0
    )
    return scores


def _pair_scores(data: EdgeData, item: Any, m: Metric, alpha: float) -> Tensor:
    """``[n_src, n_dst, batch]``: every (source, destination) pair's score at ``alpha``."""
    graph, fam = data.graph, data.family
    mask = None
    if alpha:
        mask = torch.full((len(graph),), alpha, dtype=item.ablated.dtype, device=item.tokens.device)
    probes: list[Tensor] = []
    with torch.inference_mode(False), torch.enable_grad():
        run = fam.run(
            graph,
            item.tokens,
            item.mask,
            item.ablated if alpha else None,
            mask,
            keep_outs=True,
            probes=probes,
        )
        value = m(run.logits, item.batch, item.clean)
        grads = torch.autograd.grad(value.sum(), probes)
    g = torch.cat(grads, dim=2)  # [batch, pos, n_dst, d_model]
    assert run.outs is not None
    delta = item.ablated - run.outs.detach()  # [n_src, batch, pos, d_model]
    # each layer's destinations only with the sources that can feed them (about half the
    # pairs); the other pairs are no edges and stay 0
    out = delta.new_zeros(delta.shape[0], g.shape[2], delta.shape[1])
    for d0, d1, n in _dst_blocks(graph):
        out[:n, d0:d1] = torch.einsum("nbpd,bptd->ntb", delta[:n], g[:, :, d0:d1])
    return out


def _dst_blocks(graph: Any) -> list[tuple[int, int, int]]:
    """``(first, end, n_src)`` per run of destinations in one layer: the destinations
    ``first .. end`` read only sources ``0 .. n_src``."""
    blocks: list[tuple[int, int, int]] = []
    need: dict[int, int] = {}
    for e in graph.edges:
        need[e.dst_index] = max(need.get(e.dst_index, 0), e.src_index + 1)
    start = 0
    for d in range(1, len(graph.dsts) + 1):
        if d == len(graph.dsts) or graph.dst_layer[d] != graph.dst_layer[start]:
            blocks.append((start, d, max(need.get(i, 0) for i in range(start, d))))
            start = d
    return blocks
