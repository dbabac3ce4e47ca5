"""Edge ablation from Python: run a model with edges ablated, and score edge sets.

:class:`EdgeData` prepares everything the edge algorithms share over a list of batches
(the family, the graph, the source values, the clean outputs); :func:`run_edges` is the
one-call form for a single batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from meanablate.discovery.edge_forward import StreamEdges, edge_family
from meanablate.discovery.graph import Graph, check_edge_names
from meanablate.discovery.source import Source, SourceValues, as_source, base_batch
from meanablate.hooks import model_device, to_device
from meanablate.metrics import Metric, get_metric

__all__ = ["EdgeData", "edge_mask", "run_edges"]


def edge_mask(graph: Graph, edges: Iterable[str], *, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[n_edges]`` with 1 at the named edges (checked) and 0 elsewhere."""
    m = torch.zeros(len(graph), dtype=dtype)
    idx = check_edge_names(graph, list(edges))
    if idx:
        m[idx] = 1
    return m


@dataclass
class _Prepared:
    batch: dict[str, Any]  # the base batch (denoising: the corrupted tokens)
    tokens: Tensor
    mask: Tensor | None
    ablated: Tensor  # [n_src, b|1, p|1, d_model]
    clean: Tensor  # base run's logits


class EdgeData:
    """The batches, source values and clean outputs every edge algorithm reads.

    ``batches``: dicts with ``tokens [batch, pos]`` (+ ``attention_mask``, the task's
    fields, and ``corrupt`` for a counterfactual source).

    >>> from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
    >>> cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=1, d_head=4, d_vocab=5, n_ctx=4)
    >>> batch = {"tokens": torch.zeros(2, 3, dtype=torch.long)}
    >>> data = EdgeData(HookedTransformer(cfg), [batch], "zero")
    >>> data.metric_of(["input->logits"], "kl").shape
    torch.Size([2])
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        source: Source | str = "mean",
        *,
        split_qkv: bool = True,
        graph: Graph | None = None,
    ) -> None:
        self.model = model
        self.family: StreamEdges = edge_family(model)
        self.graph = graph if graph is not None else self.family.graph(split_qkv=split_qkv)
        self.source = as_source(source)
        device = model_device(model)
        raw = [_as_dict(to_device(b, device)) for b in batches]
        if not raw:
            raise ValueError("edge algorithms need at least one batch")
        self.values = SourceValues(self.family, self.graph, raw, self.source)
        dtype = next(model.parameters()).dtype
        self.items: list[_Prepared] = []
        # What algorithms may share across calls on this data (clean streams, evaluated
        # edge sets); everything in it is a function of the data alone.
        self.cache: dict[Any, Any] = {}
        # no_grad, not inference_mode: EAP differentiates through runs that read these.
        with torch.no_grad():
            for b in raw:
                base = base_batch(b, self.source)
                tokens, mask = base["tokens"], base.get("attention_mask")
                clean = self.family.run(self.graph, tokens, mask).logits
                self.items.append(_Prepared(base, tokens, mask, self.values(b, dtype), clean))

    @property
    def n_examples(self) -> int:
        return sum(int(p.tokens.shape[0]) for p in self.items)

    def logits(self, item: _Prepared, mask: Tensor | None, **options: Any) -> Tensor:
        """The base run of one prepared batch with ``mask [n_edges]`` ablated."""
        return self.family.run(
            self.graph, item.tokens, item.mask, item.ablated, mask, **options
        ).logits

    def metric_of(self, ablated_edges: Sequence[str] | Tensor, metric: str | Metric) -> Tensor:
        """The metric per example ``[n_examples]`` with ``ablated_edges`` (names, or a
        ``[n_edges]`` mask) ablated together."""
        m = get_metric(metric)
        mask = (
            ablated_edges
            if isinstance(ablated_edges, Tensor)
            else edge_mask(self.graph, ablated_edges)
        )
        out = []
        with torch.inference_mode():
            for item in self.items:
                out.append(m(self.logits(item, mask), item.batch, item.clean).double().cpu())
        return torch.cat(out)


def _as_dict(batch: Any) -> dict[str, Any]:
    if isinstance(batch, Mapping):
        if "tokens" not in batch and "input_ids" in batch:  # a Hugging Face batch
            b = {k: v for k, v in batch.items() if k != "input_ids"}
            return {"tokens": batch["input_ids"], **b}
        if "tokens" not in batch:
            raise ValueError(f"a batch needs 'tokens' [batch, pos] (have {sorted(batch)})")
        return dict(batch)
    if isinstance(batch, Tensor):
        return {"tokens": batch}
    raise TypeError(f"a batch is a dict with 'tokens' or a tensor, got {type(batch).__name__}")


def run_edges(
    model: nn.Module,
    batch: Mapping[str, Any] | Tensor,
    edges: Iterable[str],
    source: Source | str = "zero",
    *,
    means_from: Iterable[Any] | None = None,
    split_qkv: bool = True,
) -> Tensor:
    """Logits of ``batch`` with ``edges`` ablated (each reader sees its own input).

    ``source``: ``"zero"``, ``"mean"`` / ``"mean-positional"`` (means over ``means_from``,
    default the batch itself) or ``"counterfactual"`` (``batch["corrupt"]``).

    >>> from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
    >>> cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=4)
    >>> tokens = torch.zeros(1, 3, dtype=torch.long)
    >>> run_edges(HookedTransformer(cfg), tokens, ["a0.h1->logits"]).shape
    torch.Size([1, 3, 5])
    """
    b = _as_dict(batch)
    src = as_source(source)
    family = edge_family(model)
    graph = family.graph(split_qkv=split_qkv)
    mask = edge_mask(graph, edges)
    pool = [_as_dict(x) for x in means_from] if means_from is not None else [b]
    values = SourceValues(family, graph, pool, src)
    dtype = next(model.parameters()).dtype
    base = base_batch(b, src)
    with torch.inference_mode():
        return family.run(
            graph, base["tokens"], base.get("attention_mask"), values(b, dtype), mask
        ).logits
