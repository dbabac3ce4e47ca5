"""Hugging Face GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``; transformers 5).

Heads: input of ``transformer.h.L.attn.c_proj`` ``[batch, pos, n_head * d_head]``;
neurons: output of ``transformer.h.L.mlp.act`` ``[batch, pos, n_inner or 4 * n_embd]``;
MLP: ``transformer.h.L.mlp``; attention: ``transformer.h.L.attn`` (its first output);
tail: ``transformer.ln_f`` then ``lm_head``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from meanablate.families import LinearWrite, register
from meanablate.families.hf import HFFamily
from meanablate.families.hf_positions import attend_at, bound_call, heads_view

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

    def block_at(
        self, index: int, args: tuple, kwargs: dict[str, Any], positions: Tensor
    ) -> Tensor | None:
        # GPT2Block without cross-attention, its attention's q/k/v split from c_attn
        block = self.blocks()[1][index]
        attn = getattr(block, "attn", None)
        call = bound_call(block, args, kwargs)
        if (
            call is None
            or type(block).__name__ != "GPT2Block"
            or type(attn).__name__ != "GPT2Attention"
            or call.get("encoder_hidden_states") is not None
            or (attn.reorder_and_upcast_attn and attn.config._attn_implementation == "eager")
        ):
            return None
        hidden = call["hidden_states"]
        x = block.ln_1(hidden)
        b, n, d = x.shape
        split, hd = attn.split_size, attn.head_dim
        w, bias = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: [d, 3 * split]
        xq = x[:, positions].reshape(-1, d)
        q = torch.addmm(bias[:split], xq, w[:, :split]).view(b, -1, split)
        kv = torch.addmm(bias[split:], x.reshape(-1, d), w[:, split:]).view(b, n, 2 * split)
        k, v = kv.split(split, dim=-1)
        z = attend_at(
            attn,
            heads_view(q, hd),
            heads_view(k, hd),
            heads_view(v, hd),
            call.get("attention_mask"),
            positions,
        )
        if z is None:
            return None
        h = attn.resid_dropout(attn.c_proj(z)) + hidden[:, positions]
        return h + block.mlp(block.ln_2(h))
