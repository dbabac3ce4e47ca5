"""The forward pass that honours edge ablations, for our :class:`HookedTransformer`.

Every node's output is kept apart (``outs``: one ``[batch, pos, d_model]`` tensor per
source), so a destination's input can be rebuilt as the residual stream plus, for each
ablated edge, ``mask * (ablated_src - out_src)`` — auto-circuit's difference form
(``patch_wrapper.py``), with ``mask`` a float per edge (0: clean, 1: ablated; values in
between interpolate, which is what EAP-IG integrates over). Heads read their own
query / key / value inputs; the attention bias ``b_O`` is a constant of the stream that
no edge carries (ablating a head's node ablates ``hook_z``, which leaves ``b_O`` too).

The one family-specific piece of the edge layer: :func:`edge_family` returns the object
that knows a model's graph and runs this forward (:class:`StreamEdges`). GPT-2 and
GPT-2-like bridges run on an exact copy as :class:`OursEdges`; Llama-style and NeoX models
have their own subclasses (:mod:`~meanablate.discovery.edge_hf`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from meanablate.discovery.graph import Graph, build_graph
from meanablate.organisms.transformer import HookedTransformer

__all__ = ["EdgeFamily", "EdgeRun", "OursEdges", "StreamEdges", "edge_family"]


@dataclass
class EdgeRun:
    """What a patched forward returns: ``logits``; ``outs [n_src, batch, pos, d_model]``
    (each node's output in this run) and ``inputs`` (destination name -> its input
    ``[batch, pos, d_model]``) when asked for."""

    logits: Tensor
    outs: Tensor | None = None
    inputs: dict[str, Tensor] | None = None


class EdgeFamily(Protocol):
    """What the edge layer needs from a model family."""

    def graph(self, *, split_qkv: bool = True) -> Graph: ...

    def run(
        self,
        graph: Graph,
        tokens: Tensor,
        attention_mask: Tensor | None,
        ablated: Tensor | None = None,
        edge_mask: Tensor | None = None,
        **options: Any,
    ) -> EdgeRun: ...


def edge_family(model: nn.Module) -> StreamEdges:
    """The edge description of ``model``: meanablate's own ``HookedTransformer``; a Hugging
    Face GPT-2 or GPT-2-like TransformerLens bridge (through an exact copy,
    :mod:`~meanablate.discovery.edge_families`); a Hugging Face Llama-style (Llama, Mistral,
    Qwen2) or GPT-NeoX (Pythia) causal LM, or a TransformerLens bridge over one (from the
    model's own weights, :mod:`~meanablate.discovery.edge_hf`). nnsight wrappers are
    unwrapped. Each is checked against the model's own forward when made."""
    from meanablate._unwrap import unwrap
    from meanablate.discovery.edge_families import bridge_as_hooked, gpt2_as_hooked, is_hf_gpt2
    from meanablate.discovery.edge_hf import hf_decoder_edges, is_hf_decoder
    from meanablate.families.tl_bridge import is_bridge

    model = unwrap(model)  # an nnsight wrapper: the module it wraps
    bridge = is_bridge(model)
    inner = getattr(model, "original_model", None) if bridge else model
    if isinstance(inner, nn.Module) and _is_post_ln(inner):
        raise ValueError(
            f"edges are not available for {type(inner).__name__}: BERT is post-LN (each "
            "sublayer's output is normalised together with the stream, x = LN(x + f(x))), "
            "so a destination's input is not the sum of its sources' writes and an edge "
            "ablation `resid - out_src + ablated_src` has no meaning there. Node-level "
            "discovery (sweep/attribute/discover over units) works on it."
        )
    hf_kind = is_hf_decoder(inner) if isinstance(inner, nn.Module) else None
    if isinstance(model, HookedTransformer) or is_hf_gpt2(model) or bridge or hf_kind:
        from meanablate.discovery.fastpath import any_hooks

        if any_hooks(model):
            # The edge forward calls some hook points (embeddings, layer norms, MLPs) and
            # not others (q/k/v, z): a user's hook would act in part. Refuse instead.
            raise ValueError(
                "the model carries forward hooks; edge ablation runs its own forward, which "
                "would apply them only in part. Remove the hooks (or run edge algorithms "
                "outside the `with ablate(...)` / hook context)"
            )
        if isinstance(model, HookedTransformer):
            return OursEdges(model)
        if hf_kind:
            assert inner is not None
            return hf_decoder_edges(inner, bridge=model if bridge else None)
        return OursEdges(bridge_as_hooked(model) if bridge else gpt2_as_hooked(model))
    raise TypeError(
        f"edges are not described for {type(model).__name__} yet; edge circuits work on "
        "meanablate.organisms.transformer.HookedTransformer (every built-in organism), "
        "Hugging Face GPT-2, Llama-style (LlamaForCausalLM, MistralForCausalLM, "
        "Qwen2ForCausalLM) and GPT-NeoX (GPTNeoXForCausalLM, Pythia) models, "
        "TransformerLens 4 bridges over those, and nnsight wrappers of any of them. "
        "Node-level discovery (sweep/attribute/discover over units) works on any model."
    )


def _is_post_ln(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) in ("bert", "roberta") or any(
        c.__name__.startswith(("Bert", "Roberta")) for c in type(model).__mro__
    )


def _dense_mask(graph: Graph, edge_mask: Tensor | None, device: torch.device) -> Tensor | None:
    if edge_mask is None:
        return None
    if edge_mask.shape != (len(graph),):
        raise ValueError(
            f"edge_mask must have shape [n_edges] = ({len(graph)},), got {tuple(edge_mask.shape)}"
        )
    src = torch.tensor([e.src_index for e in graph.edges], device=device)
    dst = torch.tensor([e.dst_index for e in graph.edges], device=device)
    dense = torch.zeros(len(graph.srcs), len(graph.dsts), dtype=edge_mask.dtype, device=device)
    return dense.index_put((src, dst), edge_mask.to(device))


class StreamEdges:
    """The patched forward shared by every family: a subclass gives ``cfg`` (``n_layers``,
    ``n_heads``, ``d_model``), ``parallel`` (attention and MLP of a layer both read the
    block's input) and the pieces ``embed``, ``attention``, ``attn_bias``, ``mlp`` and
    ``unembed``."""

    cfg: Any
    parallel: bool = False

    def embed(self, tokens: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def attention(
        self, layer: int, xq: Tensor, xk: Tensor, xv: Tensor, key_mask: Tensor | None
    ) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def attn_bias(self, layer: int) -> Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def mlp(self, layer: int, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def unembed(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_rows(self, graph: Graph) -> Tensor | None:
        """Bool ``[n_dst, d_model]`` of the stream dimensions each destination reads, or
        ``None`` (every dimension: a norm mixes them)."""
        return None

    # -- the patched forward -------------------------------------------------------------
    def run(
        self,
        graph: Graph,
        tokens: Tensor,
        attention_mask: Tensor | None,
        ablated: Tensor | None = None,
        edge_mask: Tensor | None = None,
        *,
        out_override: dict[int, Tensor] | None = None,
        in_override: dict[int, Tensor] | None = None,
        keep_outs: bool = False,
        record_inputs: bool = False,
        probes: list[Tensor] | None = None,
        start: tuple[int, list[Tensor], Tensor] | None = None,
        states: list[tuple[int, list[Tensor], Tensor]] | None = None,
    ) -> EdgeRun:
        """Logits with the edges in ``edge_mask`` ablated (``[n_edges]``, float).

        ``ablated``: what an ablated edge carries, ``[n_src, batch | 1, pos | 1, d_model]``.
        ``out_override``: source index -> output forced for every reader (path patching's
        frozen and patched senders); ``in_override``: destination index -> its input.
        ``probes``: a list that receives, per read, a zero tensor ``[batch, pos, width,
        d_model]`` added to the destinations' inputs, whose gradient is the gradient with
        respect to those inputs (what EAP multiplies the edge's change by).
        ``states``: a list that receives ``(layer, outputs so far, stream)`` before every
        block and the unembedding; ``start``: one of those, to resume from (valid while the
        mask changes only at destinations in that layer or later — what ACDC needs).
        """
        n_h = self.cfg.n_heads
        dense = _dense_mask(graph, edge_mask, tokens.device)
        if dense is not None and ablated is None:
            raise ValueError("an edge mask needs `ablated` (the values ablated edges carry)")
        if dense is not None and not bool(dense.any()) and not dense.requires_grad:
            dense = None
        out_override = out_override or {}
        in_override = in_override or {}
        inputs: dict[str, Tensor] = {}
        outs: list[Tensor] = []

        def emit(t: Tensor) -> Tensor:
            t = out_override.get(len(outs), t)
            outs.append(t)
            return t

        def read(d0: int, width: int, resid: Tensor) -> Tensor:
            """Inputs of destinations ``d0 .. d0 + width``: ``[batch, pos, width, d_model]``."""
            x = resid.unsqueeze(2).expand(*resid.shape[:2], width, resid.shape[-1])
            if dense is not None:
                n = len(outs)
                m = dense[:n, d0 : d0 + width]
                if m.requires_grad or bool(m.any()):
                    delta = ablated[:n] - torch.stack(outs)  # type: ignore[index]
                    x = x + torch.einsum("nbpd,nw->bpwd", delta, m.to(delta.dtype))
            if probes is not None:
                z = torch.zeros(x.shape, dtype=x.dtype, device=x.device, requires_grad=True)
                probes.append(z)
                x = x + z
            forced = [j for j in range(width) if d0 + j in in_override]
            if forced:
                x = x.clone(memory_format=torch.contiguous_format)
                for j in forced:
                    x[:, :, j] = in_override[d0 + j]
            if record_inputs:
                for j in range(width):
                    inputs[graph.dsts[d0 + j]] = x[:, :, j]
            return x

        per_head = 3 if graph.split_qkv else 1
        first = 0
        if start is None:
            resid = emit(self.embed(tokens))
        else:  # resume: the stream and node outputs before block `first`, from `states`
            first, saved, resid = start
            outs.extend(saved)
        d = first * (n_h * per_head + int(graph.has_mlp))
        for layer in range(first, self.cfg.n_layers):
            if states is not None:
                states.append((layer, list(outs), resid))
            block_in = resid
            x = read(d, n_h * per_head, resid).reshape(*resid.shape[:2], n_h, per_head, -1)
            d += n_h * per_head
            xq, xk, xv = (x[:, :, :, c] for c in ((0, 1, 2) if per_head == 3 else (0, 0, 0)))
            heads = self.attention(layer, xq, xk, xv, attention_mask)
            for h in range(n_h):
                resid = resid + emit(heads[h])
            bias = self.attn_bias(layer)
            if bias is not None:
                resid = resid + bias
            if graph.has_mlp:
                # parallel: the MLP reads the block's input (the graph has no edges from
                # this layer's heads into it)
                x = read(d, 1, block_in if self.parallel else resid)[:, :, 0]
                d += 1
                resid = resid + emit(self.mlp(layer, x))
        if states is not None:
            states.append((self.cfg.n_layers, list(outs), resid))
        x = read(d, 1, resid)[:, :, 0]
        logits = self.unembed(x)
        return EdgeRun(
            logits,
            torch.stack(outs) if keep_outs else None,
            inputs if record_inputs else None,
        )


class OursEdges(StreamEdges):
    """Edges of a :class:`HookedTransformer` (pre-LN or no-LN, with or without MLPs)."""

    def __init__(self, model: HookedTransformer) -> None:
        self.model = model
        self.cfg = model.cfg

    def embed(self, tokens: Tensor) -> Tensor:
        return self.model.embed(tokens)

    def attn_bias(self, layer: int) -> Tensor | None:
        return self.model.blocks[layer].attn.b_O

    def unembed(self, x: Tensor) -> Tensor:
        return self.model.unembed(x)

    def graph(self, *, split_qkv: bool = True) -> Graph:
        c = self.cfg
        return build_graph(c.n_layers, c.n_heads, c.d_mlp is not None, split_qkv=split_qkv)

    def read_rows(self, graph: Graph) -> Tensor | None:
        """Bool ``[n_dst, d_model]``: the stream dimensions each destination's weights read
        (``None`` with layer norms, which mix every dimension). A change confined to the
        other dimensions leaves the destination's output bitwise unchanged."""
        model = self.model
        norms = [model.ln_final] + [b.ln1 for b in model.blocks]
        norms += [b.ln2 for b in model.blocks if hasattr(b, "ln2")]
        if any(not isinstance(n, nn.Identity) for n in norms):
            return None
        rows = []
        for name in graph.dsts:
            if name == "logits":
                rows.append(model.W_U.detach().ne(0).any(1))
                continue
            if name.startswith("m"):
                rows.append(model.blocks[int(name[1:])].mlp.W_in.detach().ne(0).any(1))
                continue
            head = name.split("<")[0]
            layer, h = int(head[1:].split(".")[0]), int(head.split(".h")[1])
            attn = model.blocks[layer].attn
            qkv = name[-2] if "<" in name else None
            mats = {"q": [attn.W_Q], "k": [attn.W_K], "v": [attn.W_V]}.get(
                qkv or "", [attn.W_Q, attn.W_K, attn.W_V]
            )
            rows.append(torch.stack([w[h].detach().ne(0).any(1) for w in mats]).any(0))
        return torch.stack(rows)

    # -- pieces shared with the sweep --------------------------------------------------
    def attention(
        self, layer: int, xq: Tensor, xk: Tensor, xv: Tensor, key_mask: Tensor | None
    ) -> Tensor:
        """Per-head outputs ``[head, batch, pos, d_model]`` (no ``b_O``) from per-head
        inputs ``x* [batch, pos, head, d_model]`` (before ``ln1``)."""
        block = self.model.blocks[layer]
        attn = block.attn
        # [batch, head, pos, d] @ [head, d, d_head]: plain batched matmuls (einsum's
        # planning costs more than the product on organism-sized tensors)
        q = block.ln1(xq).transpose(1, 2) @ attn.W_Q + attn.b_Q[:, None]
        k = block.ln1(xk).transpose(1, 2) @ attn.W_K + attn.b_K[:, None]
        v = block.ln1(xv).transpose(1, 2) @ attn.W_V + attn.b_V[:, None]
        scores = q @ k.transpose(-1, -2) / self.cfg.d_head**0.5
        n = q.shape[2]
        if self.cfg.causal:
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
        pattern = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        return ((pattern @ v) @ attn.W_O).transpose(0, 1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
        cfg = self.cfg
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / cfg.d_head**0.5
        n = q.shape[1]
        if cfg.causal:
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
        pattern = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        return torch.einsum("bhqk,bkhe->bqhe", pattern, v)

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.model.blocks[layer]
        return block.mlp(block.ln2(x))
