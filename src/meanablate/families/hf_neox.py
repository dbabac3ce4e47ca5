"""Hugging Face GPT-NeoX / Pythia (``GPTNeoXForCausalLM``, ``GPTNeoXModel``).

Attention and MLP read the same stream in parallel (``use_parallel_residual``), queries
and keys are rotary. Heads: input of ``gpt_neox.layers.L.attention.dense``
``[batch, pos, n_heads * d_head]``; neurons: input of ``mlp.dense_4h_to_h``
``[batch, pos, intermediate_size]``; tail: ``gpt_neox.final_layer_norm`` then ``lm_head``.
"""

from __future__ import annotations

from typing import ClassVar

from meanablate.families import register
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
