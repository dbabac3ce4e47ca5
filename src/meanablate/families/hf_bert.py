"""Hugging Face BERT-style encoders (``BertForMaskedLM``, ``BertModel``; post-LN).

Heads: input of ``bert.encoder.layer.L.attention.output.dense``
``[batch, pos, n_heads * d_head]``; neurons: output of ``bert.encoder.layer.L.intermediate``
``[batch, pos, intermediate_size]`` (``act(dense(x))``); MLP: ``output.dense`` (before its
residual add and layer norm); attention: ``attention.output.dense``. Each layer ends in a
layer norm, so there is no final norm: the tail is the masked-LM head ``cls`` (a bare
``BertModel`` returns the last layer's output).
"""

from __future__ import annotations

from typing import ClassVar

from meanablate.families import register
from meanablate.families.hf import HFFamily

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
