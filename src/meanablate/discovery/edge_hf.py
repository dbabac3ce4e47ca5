"""Edges on Hugging Face Llama-style and GPT-NeoX decoders, from their own weights.

:class:`LlamaEdges` (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``:
RMSNorm, rotary, grouped-query attention, gated MLP) and :class:`NeoXEdges`
(``GPTNeoXForCausalLM`` / Pythia: LayerNorm, partial rotary, fused ``query_key_value``,
parallel or sequential residual) run the edge forward of
:class:`~meanablate.discovery.edge_forward.StreamEdges` with every piece computed from the
model's weights: nothing is hooked, patched or copied, and the model is left as it was.

- Every head reads its own query, key and value inputs and normalises each itself; with
  grouped-query attention a key/value head shared by several query heads is computed
  once per query head from that head's own key/value input (edges into different heads'
  ``<k>`` inputs differ).
- Rotary cos/sin come from the model's own rotary module with position ids
  ``0 .. pos - 1`` (what the Hugging Face forward uses when given no ``position_ids``,
  padding or not), so partial rotary and rope scaling follow the model.
- A head's output is its slice of ``o_proj`` / ``dense``; that projection's bias is a
  constant of the stream that no edge carries (as ``b_O`` is for our transformer).
- The ``input`` node is the token embedding: these models add no position embedding.

A TransformerLens 4 bridge over such a model is reached through ``bridge.original_model``
(the bridge's components are unwrapped to the Hugging Face modules they hold), and the
edge forward is checked against the bridge's own forward. Every family object is checked
against the model's forward when it is made; settings it does not reproduce are refused
by name.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from meanablate.discovery.edge_forward import StreamEdges
from meanablate.discovery.graph import Graph, build_graph

__all__ = ["LlamaEdges", "NeoXEdges", "hf_decoder_edges", "is_hf_decoder"]

LLAMA_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
NEOX_CLASSES = ("GPTNeoXForCausalLM",)
# softmax attention with a causal + padding mask, each (the check then confirms it)
_ATTN_IMPLEMENTATIONS = (
    "eager",
    "sdpa",
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
    None,
)
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _orig(module: Any) -> Any:
    """The Hugging Face module under a TransformerLens bridge component (or itself)."""
    inner = getattr(module, "original_component", None)
    while isinstance(inner, nn.Module) and inner is not module:
        module, inner = inner, getattr(inner, "original_component", None)
    return module


def _upcast(x: Tensor) -> Tensor:
    """Half precision computed in float32, as Hugging Face's softmax and RMSNorm do (float64
    stays float64, so finite differences of a float64 model stay smooth)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _class_names(model: nn.Module) -> set[str]:
    return {c.__name__ for c in type(model).__mro__}


def is_hf_decoder(model: nn.Module) -> str | None:
    """``"llama"`` / ``"neox"`` for a Hugging Face model of those families, else ``None``."""
    names = _class_names(model)
    if names & set(LLAMA_CLASSES):
        return "llama"
    if names & set(NEOX_CLASSES):
        return "neox"
    return None


def _refuse(model: str, what: str) -> None:
    raise ValueError(f"edges on this {model} are not available: {what}")


def _weight(linear: Any) -> tuple[Tensor, Tensor | None]:
    lin = _orig(linear)
    return lin.weight, getattr(lin, "bias", None)


class _HFEdges(StreamEdges):
    """What Llama-style and NeoX decoders share: rotary attention, masks, the check."""

    kind = "decoder"

    def __init__(self, hf: nn.Module, checked: nn.Module | None = None) -> None:
        self.model = checked if checked is not None else hf
        self.hf = hf
        self.config = hf.config
        c = self.config
        impl = getattr(c, "_attn_implementation", None)
        if impl not in _ATTN_IMPLEMENTATIONS:
            accepted = ", ".join(str(a) for a in _ATTN_IMPLEMENTATIONS[:-1])
            _refuse(self.kind, f"attention implementation {impl!r} (accepted: {accepted})")
        rope = (getattr(c, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope not in _ROPE_TYPES:
            _refuse(self.kind, f"rope_type={rope!r} (accepted: {', '.join(_ROPE_TYPES)})")
        drop = {k: getattr(c, k, 0.0) or 0.0 for k in ("attention_dropout", "hidden_dropout")}
        if hf.training and any(drop.values()):
            _refuse(
                self.kind,
                f"it is in training mode with dropout ({drop}); the edge forward has no "
                "dropout: call model.eval() first",
            )
        self._setup()
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    # -- what subclasses give --------------------------------------------------------------
    def _setup(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _qkv(self, layer: int) -> tuple[list[tuple[Tensor, Tensor | None]], Any]:
        """Per query head ``[head, d_head, d_model]`` weights and ``[head, d_head]`` biases
        of q, k and v, and the input norm."""
        raise NotImplementedError  # pragma: no cover

    # -- the pieces of the edge forward ------------------------------------------------
    def graph(self, *, split_qkv: bool = True) -> Graph:
        c = self.cfg
        g = build_graph(c.n_layers, c.n_heads, True, split_qkv=split_qkv, parallel=self.parallel)
        if self.model is self.hf:  # a bridge's node units are its own hook names (default)
            base, proj = self._sites
            g.unit_names = {}
            for layer in range(c.n_layers):
                for h in range(c.n_heads):
                    g.unit_names[f"a{layer}.h{h}"] = f"{base}.{layer}.{proj}@input[heads={h}]"
                g.unit_names[f"m{layer}"] = f"{base}.{layer}.mlp"
        return g

    def embed(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self._embed.weight)

    def _rope(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[1]
        # inference-mode tensors cannot enter a graph that EAP differentiates
        key = (n, x.device, x.dtype, torch.is_inference_mode_enabled())
        if key not in self._rope_cache:
            pos = torch.arange(n, device=x.device)[None]
            with torch.no_grad():
                cos, sin = self._rotary(x, pos)
            self._rope_cache = {key: (cos[0][:, None], sin[0][:, None])}  # [pos, 1, rot]
        return self._rope_cache[key]

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x [batch, pos, head, d_head]`` rotated on its first ``cos.shape[-1]`` dims."""
        r = cos.shape[-1]
        rot, rest = x[..., :r], x[..., r:]
        half = torch.cat((-rot[..., r // 2 :], rot[..., : r // 2]), dim=-1)
        out = rot * cos + half * sin
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)

    def attention(
        self, layer: int, xq: Tensor, xk: Tensor, xv: Tensor, key_mask: Tensor | None
    ) -> Tensor:
        """Per-head outputs ``[head, batch, pos, d_model]`` (no ``o_proj`` bias) from
        per-head inputs ``x* [batch, pos, head, d_model]`` (before the input norm)."""
        heads, parts = slice(None), self._qkv(layer)
        q, k, v = (self.project(layer, c, x, heads, parts) for c, x in zip("qkv", (xq, xk, xv)))
        return self.attend(layer, q, k, v, key_mask, heads)

    # -- per-head pieces (the forward above and the exact edge sweep) ------------------
    def project(
        self, layer: int, which: str, x: Tensor, heads: slice, parts: tuple | None = None
    ) -> Tensor:
        """Query, key or value (``which``) of ``heads`` ``[batch, pos, h, d_head]`` (rotated
        for q and k) from their inputs ``x [batch, pos, h, d_model]`` (before the norm);
        ``parts``: :meth:`_qkv`'s answer for the layer, when the caller has it."""
        parts = parts if parts is not None else self._qkv(layer)
        w, b = parts["qkv".index(which)]
        y = torch.einsum("bphd,hed->bphe", parts[3](x), w[heads])
        y = y if b is None else y + b[heads]
        if which == "v":
            return y
        cos, sin = self._rope(x)
        return self._rotate(y, cos, sin)

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, heads: slice
    ) -> Tensor:
        """Outputs ``[h, batch, pos, d_model]`` of ``heads`` from their (rotated) query, key
        and value ``[batch, pos, h, d_head]``."""
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * self.scaling
        n = q.shape[1]
        i = torch.arange(n, device=q.device)
        allowed = i[None, :] <= i[:, None]
        window = self._window(layer)
        if window is not None:
            allowed = allowed & (i[:, None] - i[None, :] < window)
        scores = scores.masked_fill(~allowed, float("-inf"))
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
        pattern = torch.softmax(_upcast(scores), dim=-1).nan_to_num(0.0).to(q.dtype)
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        return torch.einsum("bqhe,hde->hbqd", z, self._w_o(layer)[heads])

    def _window(self, layer: int) -> int | None:
        return None

    # -- the check --------------------------------------------------------------------
    def check(self) -> None:
        """The edge forward's logits equal the model's own forward's (with padding), to
        ``1e-4`` of the largest logit (``16 eps`` of the dtype in half precision)."""
        gen = torch.Generator().manual_seed(0)
        n = min(8, int(getattr(self.config, "max_position_embeddings", 8) or 8))
        dev = self._embed.weight.device
        tokens = torch.randint(0, self.cfg.d_vocab, (2, n), generator=gen).to(dev)
        mask = torch.ones_like(tokens)
        mask[1, : n // 3] = 0  # left padding, as generation batches have
        with torch.no_grad():
            if self.model is self.hf:
                want = self.hf(input_ids=tokens, attention_mask=mask).logits
            else:  # a TransformerLens bridge: its own forward
                want = self.model(tokens, attention_mask=mask)
            got = self.run(self.graph(), tokens, mask).logits
        real = mask.bool()
        want, got = want[real], got[real]
        scale = float(want.abs().max()) + 1.0
        # half precision: both forwards round at every step, in different orders
        tol = max(1e-4, 16 * torch.finfo(want.dtype).eps)
        if not torch.allclose(got.to(want.dtype), want, atol=tol * scale, rtol=tol):
            raise ValueError(
                f"the edge forward for this {self.kind} does not reproduce the model's logits "
                f"(max difference {float((got - want).abs().max()):.3g}); edges are not "
                "available for this model"
            )


class LlamaEdges(_HFEdges):
    """Edges of a Llama-style causal LM (Llama, Mistral, Qwen2); see the module docstring.

    >>> import transformers
    >>> cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24,
    ...     num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1, vocab_size=11)
    >>> fam = LlamaEdges(transformers.LlamaForCausalLM(cfg).eval())
    >>> len(fam.graph()), fam.graph().names[0]
    (23, 'input->a0.h0<q>')
    """

    kind = "Llama-style model"
    _sites = ("model.layers", "self_attn.o_proj")  # node units: the model's own sites

    def _setup(self) -> None:
        c = self.config
        base = _orig(self.hf.model)
        self._embed = _orig(base.embed_tokens)
        self._rotary = _orig(base.rotary_emb)
        self._norm = _orig(base.norm)
        self._head = _orig(self.hf.lm_head)
        self._layers = [_orig(layer) for layer in base.layers]
        n_h, n_kv = c.num_attention_heads, c.num_key_value_heads
        self.d_head = getattr(c, "head_dim", None) or c.hidden_size // n_h
        self.scaling = self.d_head**-0.5
        self.groups = n_h // n_kv
        self.cfg = SimpleNamespace(
            n_layers=c.num_hidden_layers,
            n_heads=n_h,
            d_model=c.hidden_size,
            d_head=self.d_head,
            d_vocab=c.vocab_size,
        )
        from transformers.activations import ACT2FN

        self.act = ACT2FN[c.hidden_act]

    def _window(self, layer: int) -> int | None:
        c = self.config
        sw = getattr(c, "sliding_window", None)
        types = getattr(c, "layer_types", None)
        if types:
            return sw if types[layer] == "sliding_attention" else None
        return sw if sw and getattr(c, "use_sliding_window", True) else None

    def _rms(self, norm: Any, x: Tensor) -> Tensor:
        n = _orig(norm)
        eps = getattr(n, "variance_epsilon", getattr(n, "eps", 1e-6))
        h = _upcast(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return n.weight * h.to(x.dtype)

    def _qkv(self, layer: int) -> tuple:
        blk = self._layers[layer]
        attn = _orig(blk.self_attn)
        n_h, dh = self.cfg.n_heads, self.d_head
        out = []
        for name, heads in (("q_proj", n_h), ("k_proj", n_h // self.groups), ("v_proj", 0)):
            w, b = _weight(getattr(attn, name))
            heads = heads or n_h // self.groups
            w = w.view(heads, dh, -1)
            b = None if b is None else b.view(heads, dh)
            if name != "q_proj" and self.groups > 1:  # query head h uses kv head h // groups
                w = w.repeat_interleave(self.groups, 0)
                b = None if b is None else b.repeat_interleave(self.groups, 0)
            out.append((w, b))
        return (*out, lambda x: self._rms(blk.input_layernorm, x))

    def _w_o(self, layer: int) -> Tensor:
        w, _ = _weight(_orig(self._layers[layer].self_attn).o_proj)  # [d_model, n_h * dh]
        return w.view(w.shape[0], self.cfg.n_heads, self.d_head).permute(1, 0, 2)

    def attn_bias(self, layer: int) -> Tensor | None:
        return _weight(_orig(self._layers[layer].self_attn).o_proj)[1]

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        blk = self._layers[layer]
        mlp = _orig(blk.mlp)
        h = self._rms(blk.post_attention_layernorm, x)
        gate = F.linear(h, *_weight(mlp.gate_proj))
        up = F.linear(h, *_weight(mlp.up_proj))
        return F.linear(self.act(gate) * up, *_weight(mlp.down_proj))

    def unembed(self, x: Tensor) -> Tensor:
        return F.linear(self._rms(self._norm, x), *_weight(self._head))


class NeoXEdges(_HFEdges):
    """Edges of a GPT-NeoX / Pythia causal LM; ``use_parallel_residual=True`` gives a
    graph without same-layer head -> MLP edges (see :func:`build_graph`'s ``parallel``).

    >>> import transformers
    >>> cfg = transformers.GPTNeoXConfig(hidden_size=16, intermediate_size=24,
    ...     num_attention_heads=2, num_hidden_layers=1, vocab_size=11)
    >>> fam = NeoXEdges(transformers.GPTNeoXForCausalLM(cfg).eval())
    >>> fam.parallel, len(fam.graph())
    (True, 11)
    """

    kind = "GPT-NeoX model"
    _sites = ("gpt_neox.layers", "attention.dense")

    def _setup(self) -> None:
        c = self.config
        base = _orig(self.hf.gpt_neox)
        self._embed = _orig(base.embed_in)
        self._rotary = _orig(base.rotary_emb)
        self._norm = _orig(base.final_layer_norm)
        self._head = _orig(self.hf.embed_out if hasattr(self.hf, "embed_out") else self.hf.lm_head)
        self._layers = [_orig(layer) for layer in base.layers]
        n_h = c.num_attention_heads
        self.d_head = c.hidden_size // n_h
        self.scaling = self.d_head**-0.5
        self.parallel = bool(c.use_parallel_residual)
        self.cfg = SimpleNamespace(
            n_layers=c.num_hidden_layers,
            n_heads=n_h,
            d_model=c.hidden_size,
            d_head=self.d_head,
            d_vocab=c.vocab_size,
        )
        from transformers.activations import ACT2FN

        self.act = ACT2FN[c.hidden_act]

    def _ln(self, norm: Any, x: Tensor) -> Tensor:
        n = _orig(norm)
        return F.layer_norm(x, n.normalized_shape, n.weight, n.bias, n.eps)

    def _qkv(self, layer: int) -> tuple:
        blk = self._layers[layer]
        w, b = _weight(_orig(blk.attention).query_key_value)  # rows: [head, (q|k|v), d_head]
        n_h, dh = self.cfg.n_heads, self.d_head
        w = w.view(n_h, 3, dh, -1)
        b = None if b is None else b.view(n_h, 3, dh)
        parts = [(w[:, c], None if b is None else b[:, c]) for c in range(3)]
        return (*parts, lambda x: self._ln(blk.input_layernorm, x))

    def _w_o(self, layer: int) -> Tensor:
        w, _ = _weight(_orig(self._layers[layer].attention).dense)
        return w.view(w.shape[0], self.cfg.n_heads, self.d_head).permute(1, 0, 2)

    def attn_bias(self, layer: int) -> Tensor | None:
        return _weight(_orig(self._layers[layer].attention).dense)[1]

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        blk = self._layers[layer]
        mlp = _orig(blk.mlp)
        h = self._ln(blk.post_attention_layernorm, x)
        return F.linear(
            self.act(F.linear(h, *_weight(mlp.dense_h_to_4h))), *_weight(mlp.dense_4h_to_h)
        )

    def unembed(self, x: Tensor) -> Tensor:
        return F.linear(self._ln(self._norm, x), *_weight(self._head))


def hf_decoder_edges(model: nn.Module, *, bridge: nn.Module | None = None) -> _HFEdges:
    """The edge family of a Hugging Face Llama-style or NeoX causal LM (``bridge``: the
    TransformerLens bridge wrapping it, whose forward the check compares against)."""
    kind = is_hf_decoder(model)
    if kind is None:
        raise TypeError(f"{type(model).__name__} is not a Llama-style or GPT-NeoX causal LM")
    fam = (LlamaEdges if kind == "llama" else NeoXEdges)(model, bridge)
    fam.check()
    return fam
