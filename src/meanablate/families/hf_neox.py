"""Hugging Face GPT-NeoX / Pythia (``GPTNeoXForCausalLM``, ``GPTNeoXModel``).

Attention and MLP read the same stream in parallel (``use_parallel_residual``), queries
and keys are rotary. Heads: input of ``gpt_neox.layers.L.attention.dense``
``[batch, pos, n_heads * d_head]``; neurons: input of ``mlp.dense_4h_to_h``
``[batch, pos, intermediate_size]``; tail: ``gpt_neox.final_layer_norm`` then ``lm_head``.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

from torch import Tensor

from meanablate.families import LinearWrite, register
from meanablate.families.hf import HFFamily
from meanablate.families.hf_positions import attend_at, bound_call

__all__ = ["HFNeoX"]


@register
class HFNeoX(HFFamily):
    name = "hf_neox"
    base_classes = ("GPTNeoXModel",)
    base_attr = "gpt_neox"
    block_list = "layers"
    final_norm = "final_layer_norm"
    heads_site = "layers.{L}.attention.dense@input"
    neurons_site = "layers.{L}.mlp.dense_4h_to_h@input"
    mlp_site = "layers.{L}.mlp"
    attn_site = "layers.{L}.attention"
    roots: ClassVar[dict[str, str | None]] = {"GPTNeoXForCausalLM": "lm_head"}

    def neuron_weight(self, layer: int) -> Tensor:
        # block output = mlp_out + attn_out + h (parallel) or mlp_out + attn_out
        # (sequential); mlp_out = dense_4h_to_h(act) either way; nn.Linear: [out, in]
        return self._module("layers.{L}.mlp.dense_4h_to_h", layer).weight.T

    def head_weight(self, layer: int) -> Tensor:
        return self._module("layers.{L}.attention.dense", layer).weight.T

    def head_enters(self) -> str | None:
        # Parallel: the MLP reads the block's input, so the heads' delta only adds to
        # the block output. Sequential: it enters the stream the MLP half reads.
        return "post" if getattr(self.config, "use_parallel_residual", True) else "mid"

    def finish_heads(self, write: LinearWrite, z: Tensor, block_input: Tensor) -> Tensor:
        # GPTNeoXLayer (sequential): attn_output = dropout(dense(z)) + h;
        # h = dropout(mlp(post_attention_layernorm(attn_output))) + attn_output
        layer = self._module("layers.{L}", write.layer)
        attn_output = layer.post_attention_dropout(layer.attention.dense(z)) + block_input
        mlp_output = layer.post_mlp_dropout(layer.mlp(layer.post_attention_layernorm(attn_output)))
        return mlp_output + attn_output

    def block_at(
        self, index: int, args: tuple, kwargs: dict[str, Any], positions: Tensor
    ) -> Tensor | None:
        # GPTNeoXLayer: fused per-head q/k/v, partial rotary (the recorded cos/sin span
        # the rotary dims), then the parallel or sequential residual
        layer = self.blocks()[1][index]
        attn = getattr(layer, "attention", None)
        call = bound_call(layer, args, kwargs)
        rope = call.get("position_embeddings") if call is not None else None
        rotate = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
        if (
            type(layer).__name__ != "GPTNeoXLayer"
            or type(attn).__name__ != "GPTNeoXAttention"
            or not isinstance(rope, tuple)
            or rotate is None
        ):
            return None
        cos, sin = rope
        hidden = call["hidden_states"]  # type: ignore[index]
        x = layer.input_layernorm(hidden)
        hs = attn.head_size
        qkv = attn.query_key_value(x).view(*x.shape[:2], -1, 3 * hs).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q = q[:, :, positions]
        q = rotate(q, q, cos[:, positions], sin[:, positions])[0]
        k = rotate(k, k, cos, sin)[1]
        z = attend_at(attn, q, k, v, call.get("attention_mask"), positions)  # type: ignore[union-attr]
        if z is None:
            return None
        a = layer.post_attention_dropout(attn.dense(z))
        here = hidden[:, positions]
        if layer.use_parallel_residual:
            mlp = layer.post_mlp_dropout(layer.mlp(layer.post_attention_layernorm(here)))
            return mlp + a + here
        a = a + here
        return layer.post_mlp_dropout(layer.mlp(layer.post_attention_layernorm(a))) + a
