"""Hugging Face GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``; transformers 5).

Heads: input of ``transformer.h.L.attn.c_proj`` ``[batch, pos, n_head * d_head]``;
neurons: output of ``transformer.h.L.mlp.act`` ``[batch, pos, n_inner or 4 * n_embd]``;
MLP: ``transformer.h.L.mlp``; attention: ``transformer.h.L.attn`` (its first output);
tail: ``transformer.ln_f`` then ``lm_head``.
"""

from __future__ import annotations

from typing import ClassVar

from meanablate.families import register
from meanablate.families.hf import HFFamily

__all__ = ["HFGPT2"]


@register
class HFGPT2(HFFamily):
    """GPT-2 (``c_proj`` is a ``Conv1D``: ``y = x @ weight + bias``, weight ``[in, out]``)."""

    name = "hf_gpt2"
    base_classes = ("GPT2Model",)
    base_attr = "transformer"
    block_list = "h"
    final_norm = "ln_f"
    heads_site = "h.{L}.attn.c_proj@input"
    neurons_site = "h.{L}.mlp.act"
    mlp_site = "h.{L}.mlp"
    attn_site = "h.{L}.attn"
    roots: ClassVar[dict[str, str | None]] = {"GPT2LMHeadModel": "lm_head"}

    @property
    def n_heads(self) -> int:
        return int(self.config.n_head)

    @property
    def d_head(self) -> int:
        return int(self.config.n_embd) // self.n_heads

    @property
    def d_mlp(self) -> int:
        inner = self.config.n_inner
        return int(inner) if inner is not None else 4 * int(self.config.n_embd)
