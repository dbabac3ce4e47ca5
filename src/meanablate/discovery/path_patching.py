"""Path patching (Wang et al. 2022, "Interpretability in the Wild", section 3.1).

The effect of sender nodes on the metric *through chosen receivers only*, in two passes:

1. run the base input with every sender's output replaced by its source value (the
   corrupted run's, a mean, or zero) and every other node *frozen* at its clean output;
   record what each receiver reads;
2. run the base input again with only the receivers' inputs replaced by those records;
   everything downstream of them recomputes. The metric's change is the path's effect.

``freeze="heads"`` freezes attention heads only and lets MLPs recompute in pass 1 (the
IOI paper's setting, where MLPs count as part of the direct path); ``freeze="all"``
freezes every node, so only the direct sender -> receiver edges carry the change — the
same as ablating the edges ``senders x receivers``, which the tests check.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from meanablate.discovery.edges import EdgeData
from meanablate.discovery.scores import Scores
from meanablate.discovery.source import Source
from meanablate.metrics import Metric, get_metric

__all__ = ["path_patching"]


def path_patching(
    model: nn.Module,
    batches: Iterable[Any] | EdgeData,
    senders: Sequence[str | Sequence[str]],
    receivers: Sequence[str],
    source: Source | str = "counterfactual",
    *,
    metric: str | Metric = "logit_diff",
    freeze: Literal["all", "heads"] = "heads",
) -> Scores:
    """The effect of each sender (a node, or a list of nodes patched together) through
    ``receivers`` only: :class:`Scores` with one row per entry of ``senders``.

    ``receivers``: destination inputs (``"a1.h0<k>"``), whole nodes (``"a1.h0"``: its
    q, k and v inputs; ``"m1"``) or ``"logits"``. Senders are node names (``"a0.h1"``,
    ``"m0"``, ``"input"``).

    >>> from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
    >>> cfg = TransformerConfig(n_layers=2, d_model=8, n_heads=1, d_head=4, d_vocab=5, n_ctx=4)
    >>> batch = {"tokens": torch.tensor([[1, 2, 3]]), "corrupt": torch.tensor([[3, 2, 1]])}
    >>> s = path_patching(HookedTransformer(cfg), [batch], ["a0.h0"], ["a1.h0<k>"], metric="kl")
    >>> s.units
    ['a0.h0']
    """
    if freeze not in ("all", "heads"):
        raise ValueError(f"freeze must be 'all' or 'heads', got {freeze!r}")
    m = get_metric(metric)
    data = batches if isinstance(batches, EdgeData) else EdgeData(model, batches, source)
    graph = data.graph
    groups = [[s] if isinstance(s, str) else list(s) for s in senders]
    if not groups or any(not g for g in groups):
        raise ValueError("senders must be a non-empty list of nodes or non-empty node lists")
    sender_idx = [[graph.src_index(s) for s in g] for g in groups]
    receiver_dsts = _receivers(graph, receivers)
    t0 = time.perf_counter()
    rows: list[list[torch.Tensor]] = [[] for _ in groups]
    with torch.inference_mode():
        for item in data.items:
            fam = data.family
            clean = fam.run(graph, item.tokens, item.mask, keep_outs=True)
            assert clean.outs is not None
            scorer = m.bind(item.batch, item.clean)
            for g, idx in enumerate(sender_idx):
                override = {}
                for i, node in enumerate(graph.srcs):
                    if i in idx:
                        override[i] = item.ablated[i].expand_as(clean.outs[i])
                    elif node.kind != "input" and (freeze == "all" or node.kind == "head"):
                        override[i] = clean.outs[i]
                first = fam.run(
                    graph, item.tokens, item.mask, out_override=override, record_inputs=True
                )
                assert first.inputs is not None
                forced = {d: first.inputs[graph.dsts[d]] for d in receiver_dsts}
                logits = fam.run(graph, item.tokens, item.mask, in_override=forced).logits
                rows[g].append(scorer(logits).double().cpu())
    names = [g[0] if len(g) == 1 else "+".join(g) for g in groups]
    per_example = torch.stack([torch.cat(r) for r in rows])
    return Scores.from_examples(
        names, per_example, m.name, "path_patching", time.perf_counter() - t0
    )


def _receivers(graph: Any, receivers: Sequence[str]) -> list[int]:
    if isinstance(receivers, str) or not receivers:
        raise ValueError("receivers must be a non-empty list (e.g. ['a1.h0<k>', 'logits'])")
    out: list[int] = []
    for r in receivers:
        hits = [i for i, d in enumerate(graph.dsts) if d == r or d.split("<")[0] == r]
        if not hits:
            raise ValueError(
                f"receiver {r!r} is not a destination of this graph; destinations: "
                f"{', '.join(graph.dsts[:12])}{' ...' if len(graph.dsts) > 12 else ''}"
            )
        out += hits
    return sorted(set(out))
