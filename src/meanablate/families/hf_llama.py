"""Hugging Face Llama-style decoders (Llama, Mistral, Qwen2: RMSNorm, rotary, grouped-
query attention, gated MLP).

Heads: input of ``model.layers.L.self_attn.o_proj`` ``[batch, pos, n_heads * head_dim]``
(the query heads; with grouped-query attention several share a key/value head);
neurons: input of ``mlp.down_proj`` ``[batch, pos, intermediate_size]``, i.e.
``act(gate_proj(x)) * up_proj(x)``; tail: ``model.norm`` then ``lm_head``.

A model is Llama-style when its base model has ``layers``, ``norm`` and ``embed_tokens``
and its first layer has exactly Llama's modules; resuming from a layer is declared safe
only for the classes listed in ``roots`` (others, e.g. Gemma, scale or cap what they
compute outside the layers; :meth:`HFFamily.can_resume` checks the exact classes).
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

from torch import Tensor, nn

from meanablate.families import LinearWrite, register
from meanablate.families.hf import HFFamily
from meanablate.families.hf_positions import attend_at, bound_call, heads_view

__all__ = ["HFLlama"]

_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}
_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}
_ATTNS = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}


@register
class HFLlama(HFFamily):
    name = "hf_llama"
    base_classes = ("LlamaModel", "MistralModel", "Qwen2Model")
    base_attr = "model"
    block_list = "layers"
    final_norm = "norm"
    heads_site = "layers.{L}.self_attn.o_proj@input"
    neurons_site = "layers.{L}.mlp.down_proj@input"
    mlp_site = "layers.{L}.mlp"
    attn_site = "layers.{L}.self_attn"
    roots: ClassVar[dict[str, str | None]] = {
        "LlamaForCausalLM": "lm_head",
        "MistralForCausalLM": "lm_head",
        "Qwen2ForCausalLM": "lm_head",
    }

    @classmethod
    def is_base(cls, module: nn.Module) -> bool:
        if super().is_base(module):
            return True
        layers = getattr(module, "layers", None)
        if not (
            isinstance(layers, nn.ModuleList)
            and len(layers)
            and hasattr(module, "norm")
            and hasattr(module, "embed_tokens")
            and hasattr(module, "config")
        ):
            return False
        first = layers[0]
        children = {n for n, _ in first.named_children()}
        mlp = getattr(first, "mlp", None)
        attn = getattr(first, "self_attn", None)
        return (
            children == _LAYER_CHILDREN
            and isinstance(mlp, nn.Module)
            and {n for n, _ in mlp.named_children()} == _MLP_CHILDREN
            and isinstance(getattr(attn, "o_proj", None), nn.Linear)
        )

    def neuron_weight(self, layer: int) -> Tensor:
        # block output = resid_mid + down_proj(act); nn.Linear's weight is [out, in]
        path = self.site_of(self.neurons_site, layer).removesuffix("@input")
        return self.model.get_submodule(path).weight.T

    def head_weight(self, layer: int) -> Tensor:
        return self._module("layers.{L}.self_attn.o_proj", layer).weight.T

    def finish_heads(self, write: LinearWrite, z: Tensor, block_input: Tensor) -> Tensor:
        # LlamaDecoderLayer: h = residual + o_proj(z); h = h + mlp(post_attention_layernorm(h))
        mid = block_input + self._module("layers.{L}.self_attn.o_proj", write.layer)(z)
        norm = self._module("layers.{L}.post_attention_layernorm", write.layer)
        return mid + self._module("layers.{L}.mlp", write.layer)(norm(mid))

    def block_at(
        self, index: int, args: tuple, kwargs: dict[str, Any], positions: Tensor
    ) -> Tensor | None:
        # LlamaDecoderLayer: h = x + o_proj(attn(input_layernorm(x))), then the MLP half;
        # rotary with the recorded (cos, sin), queries rotated at their own positions
        layer = self.blocks()[1][index]
        attn = getattr(layer, "self_attn", None)
        call = bound_call(layer, args, kwargs)
        rope = call.get("position_embeddings") if call is not None else None
        module = sys.modules.get(type(attn).__module__)
        rotate = getattr(module, "apply_rotary_pos_emb", None)
        if (
            type(layer).__name__ not in _LAYERS
            or type(attn).__name__ not in _ATTNS
            or not isinstance(rope, tuple)
            or rotate is None
        ):
            return None
        cos, sin = rope
        hidden = call["hidden_states"]  # type: ignore[index]
        x = layer.input_layernorm(hidden)
        hd = attn.head_dim
        q = heads_view(attn.q_proj(x[:, positions]), hd)
        k = heads_view(attn.k_proj(x), hd)
        v = heads_view(attn.v_proj(x), hd)
        q = rotate(q, q, cos[:, positions], sin[:, positions])[0]
        k = rotate(k, k, cos, sin)[1]
        z = attend_at(attn, q, k, v, call.get("attention_mask"), positions)  # type: ignore[union-attr]
        if z is None:
            return None
        h = hidden[:, positions] + attn.o_proj(z)
        return h + layer.mlp(layer.post_attention_layernorm(h))
