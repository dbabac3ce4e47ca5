"""Hugging Face GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``; transformers 5).

Heads: input of ``transformer.h.L.attn.c_proj`` ``[batch, pos, n_head * d_head]``;
neurons: output of ``transformer.h.L.mlp.act`` ``[batch, pos, n_inner or 4 * n_embd]``;
MLP: ``transformer.h.L.mlp``; attention: ``transformer.h.L.attn`` (its first output);
tail: ``transformer.ln_f`` then ``lm_head``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from meanablate.families import LinearWrite, register
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

    def neuron_weight(self, layer: int) -> Tensor:
        # block output = resid_mid + dropout(c_proj(act)); c_proj is a Conv1D, whose
        # weight is [in, out] = [d_mlp, d_model] (dropout: identity in eval mode)
        return self._module("h.{L}.mlp.c_proj", layer).weight

    def head_weight(self, layer: int) -> Tensor:
        return self._module("h.{L}.attn.c_proj", layer).weight  # Conv1D: [in, out]

    def head_enters(self) -> str | None:
        # With cross-attention, ln_2 reads the stream after it: the heads' delta would
        # pass through the cross-attention, which is not re-run here.
        return None if getattr(self.config, "add_cross_attention", False) else "mid"

    def finish_heads(self, write: LinearWrite, z: Tensor, block_input: Tensor) -> Tensor:
        # GPT2Block: h = attn_output + residual; then residual = h; h = residual + mlp(ln_2(h))
        attn = self._module("h.{L}.attn", write.layer)
        mid = attn.resid_dropout(attn.c_proj(z)) + block_input
        mlp = self._module("h.{L}.mlp", write.layer)
        return mid + mlp(self._module("h.{L}.ln_2", write.layer)(mid))
