"""Ground-truth edges of the built-in organisms.

tracr (Lindner et al. 2023) compiles each RASP operation into a component that reads and
writes named subspaces of the residual stream; ACDC (Conmy et al. 2023) takes as tracr's
true edges "which component reads which". We read that off the compiled weights: the
*program edges* are the pairs where the source writes a stream dimension that the
destination's weights read (``W_Q``/``W_K``/``W_V`` rows of a head, ``W_in`` rows of an
MLP, ``W_U`` rows for the logits; the embeddings write ``W_E`` and ``W_pos``'s columns).

Our organisms are scored under per-position mean ablation (their cards say why), and
under it an edge that carries only a per-position constant — the length, the indices,
the opposite index in ``reverse`` — is exactly its own mean, so ablating it changes
nothing; and some program edges feed a computation that ignores them (``length`` reads
the tokens through a query-key form that is constant). The *true edges* are therefore the
program edges whose per-position mean ablation changes what their destination computes
on the organism's exhaustive data set. The tests cross-check them by
ablation: ablating every other edge keeps accuracy at 100%, ablating any true edge alone
raises the metric.

The induction organism's true edges are its mechanism under plain mean ablation: the
previous-token head reads the token (value) and the positions (query, key); the induction
head's key reads the previous-token head, its query and value the token; the induction
head writes the logits. The two edges the issue names (previous-token head -> induction
head's key, induction head -> logits) are among them; the input edges must be counted
too, or the input -> induction-head value edge (the token being copied, the largest
effect of all) would count as a false positive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from meanablate.discovery.edge_forward import edge_family
from meanablate.discovery.graph import Graph, unit_node
from meanablate.organisms.transformer import HookedTransformer

__all__ = ["edge_ground_truth", "induction_true_edges", "program_edges", "tracr_true_edges"]


def _writes(model: HookedTransformer, graph: Graph) -> Tensor:
    """Bool ``[n_src, d_model]``: the stream dimensions each source can write."""
    rows = []
    for node in graph.srcs:
        if node.kind == "input":
            rows.append(model.W_E.detach().ne(0).any(0) | model.W_pos.detach().ne(0).any(0))
        elif node.kind == "head":
            w = model.blocks[node.layer].attn.W_O[node.head].detach()
            rows.append(w.ne(0).any(0))
        else:
            mlp = model.blocks[node.layer].mlp
            rows.append(mlp.W_out.detach().ne(0).any(0) | mlp.b_out.detach().ne(0))
    return torch.stack(rows)


def program_edges(model: HookedTransformer, graph: Graph | None = None) -> list[str]:
    """Edges where the source writes a dimension the destination reads (tracr models:
    the compiled program's data flow). Needs a model without layer norms."""
    fam = edge_family(model)
    graph = graph if graph is not None else fam.graph()
    reads = fam.read_rows(graph)
    if reads is None:
        raise ValueError("program edges need a model without layer norms (tracr-compiled)")
    writes = _writes(model, graph)
    return [e.name for e in graph.edges if bool((writes[e.src_index] & reads[e.dst_index]).any())]


def tracr_true_edges(
    model: HookedTransformer, batches: Sequence[Any], graph: Graph | None = None
) -> list[str]:
    """Program edges whose per-position mean ablation changes what their destination
    computes (its output, or the logits) on ``batches``."""
    from meanablate.discovery.edges import EdgeData, edge_mask

    data = EdgeData(model, batches, "mean-positional", graph=graph)
    graph = data.graph
    out = []
    with torch.no_grad():
        clean = [data.family.run(graph, it.tokens, it.mask, keep_outs=True) for it in data.items]
        for name in program_edges(model, graph):
            e = graph.edge(name)
            mask = edge_mask(graph, [name])
            for it, ref in zip(data.items, clean):
                run = data.family.run(graph, it.tokens, it.mask, it.ablated, mask, keep_outs=True)
                if e.dst == "logits":
                    moved = (run.logits - ref.logits).abs().max()
                else:
                    i = graph.src_index(e.dst)
                    moved = (run.outs[i] - ref.outs[i]).abs().max()  # type: ignore[index]
                if float(moved) > 1e-5:
                    out.append(name)
                    break
    return out


def induction_true_edges(card: dict[str, Any], graph: Graph) -> list[str]:
    """The induction mechanism's edges (see the module docstring)."""
    prev = unit_node(card["previous_token_heads"][0])
    ind = unit_node(card["induction_heads"][0])
    names = [
        f"input->{prev}<q>",
        f"input->{prev}<k>",
        f"input->{prev}<v>",
        f"{prev}->{ind}<k>",
        f"input->{ind}<q>",
        f"input->{ind}<v>",
        f"{ind}->logits",
    ]
    graph.indices(names)
    return names


def edge_ground_truth(organism: Any) -> list[str]:
    """True edges of a built-in organism (``tracr-*`` or ``induction``)."""
    graph = edge_family(organism.model).graph()
    if organism.name.startswith("tracr-"):
        from meanablate.organisms.tracr_models import exhaustive_batches

        return tracr_true_edges(organism.model, exhaustive_batches(organism.card), graph)
    if organism.name == "induction":
        return induction_true_edges(dict(organism.card), graph)
    raise ValueError(
        f"no edge ground truth for organism {organism.name!r}; known: tracr-*, induction"
    )
