"""Hugging Face GPT-NeoX / Pythia (``GPTNeoXForCausalLM``, ``GPTNeoXModel``).

Attention and MLP read the same stream in parallel (``use_parallel_residual``), queries
and keys are rotary. Heads: input of ``gpt_neox.layers.L.attention.dense``
``[batch, pos, n_heads * d_head]``; neurons: input of ``mlp.dense_4h_to_h``
``[batch, pos, intermediate_size]``; tail: ``gpt_neox.final_layer_norm`` then ``lm_head``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from meanablate.families import LinearWrite, register
from meanablate.families.hf import HFFamily

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
