"""Hugging Face BERT-style encoders (``BertForMaskedLM``, ``BertModel``; post-LN).

Heads: input of ``bert.encoder.layer.L.attention.output.dense``
``[batch, pos, n_heads * d_head]``; neurons: output of ``bert.encoder.layer.L.intermediate``
``[batch, pos, intermediate_size]`` (``act(dense(x))``); MLP: ``output.dense`` (before its
residual add and layer norm); attention: ``attention.output.dense``. Each layer ends in a
layer norm, so there is no final norm: the tail is the masked-LM head ``cls`` (a bare
``BertModel`` returns the last layer's output).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from meanablate.families import LinearWrite, register
from meanablate.families.hf import HFFamily
from meanablate.families.hf_positions import attend_at, bound_call, heads_view

__all__ = ["HFBert"]


@register
class HFBert(HFFamily):
    name = "hf_bert"
    base_classes = ("BertModel",)
    base_attr = "bert"
    block_list = "encoder.layer"
    final_norm = None
    heads_site = "encoder.layer.{L}.attention.output.dense@input"
    neurons_site = "encoder.layer.{L}.intermediate"
    mlp_site = "encoder.layer.{L}.output.dense"
    attn_site = "encoder.layer.{L}.attention.output.dense"
    roots: ClassVar[dict[str, str | None]] = {"BertForMaskedLM": "cls", "BertLMHeadModel": "cls"}

    def can_resume(self) -> bool:
        # Chunked feed-forward calls the MLP once per chunk of positions.
        if getattr(self.config, "chunk_size_feed_forward", 0):
            return False
        return super().can_resume()

    # Post-LN: both kinds of unit write through a dense layer whose output is added to
    # the sublayer's input *before* its LayerNorm, so the delta enters there ("norm").
    neuron_enters = "norm"

    def head_enters(self) -> str | None:
        # A decoder with cross-attention runs it between the two halves: not re-run here.
        return None if getattr(self.config, "add_cross_attention", False) else "norm"

    def neuron_weight(self, layer: int) -> Tensor:
        return self._module("encoder.layer.{L}.output.dense", layer).weight.T

    def head_weight(self, layer: int) -> Tensor:
        return self._module("encoder.layer.{L}.attention.output.dense", layer).weight.T

    def stream_key(self, write: LinearWrite) -> str | None:
        # a neuron: BertOutput(x, input_tensor) = LayerNorm(dropout(dense(x)) +
        # input_tensor), input_tensor the attention output (the intermediate's input)
        if write.enters != "norm" or write.weight.ndim != 2:
            return None
        return self.site_of("encoder.layer.{L}.intermediate@input", write.layer)

    def finish_block(self, write: LinearWrite, z: Tensor, stream: Tensor) -> Tensor:
        # dense re-runs on the ablated neurons (not clean + delta): the pre-LN sum is then
        # the hooked forward's own, bit for bit, at the cost of one [d_mlp, d_model] product
        return self._module("encoder.layer.{L}.output", write.layer)(z, stream)

    def finish_heads(self, write: LinearWrite, z: Tensor, block_input: Tensor) -> Tensor:
        # BertLayer: attention_output = BertSelfOutput(z, h) (dense, dropout, LayerNorm of
        # the sum), then feed_forward_chunk (can_resume excludes chunking)
        layer = self._module("encoder.layer.{L}", write.layer)
        attention_output = layer.attention.output(z, block_input)
        return layer.output(layer.intermediate(attention_output), attention_output)

    def block_at(
        self, index: int, args: tuple, kwargs: dict[str, Any], positions: Tensor
    ) -> Tensor | None:
        # BertLayer without cross-attention: self-attention (queries at positions),
        # BertSelfOutput (dense, dropout, LayerNorm of the sum with the input), then the
        # feed-forward chunk (can_resume excludes chunking)
        layer = self.blocks()[1][index]
        attention = getattr(layer, "attention", None)
        sa = getattr(attention, "self", None)
        call = bound_call(layer, args, kwargs)
        if (
            call is None
            or type(layer).__name__ != "BertLayer"
            or type(attention).__name__ != "BertAttention"
            or type(sa).__name__ != "BertSelfAttention"
            or call.get("encoder_hidden_states") is not None
        ):
            return None
        hidden = call["hidden_states"]
        here = hidden[:, positions]
        hd = sa.attention_head_size
        q = heads_view(sa.query(here), hd)
        k, v = heads_view(sa.key(hidden), hd), heads_view(sa.value(hidden), hd)
        z = attend_at(sa, q, k, v, call.get("attention_mask"), positions)
        if z is None:
            return None
        out = attention.output(z, here)
        return layer.output(layer.intermediate(out), out)
