"""A hand-written edge reference for Hugging Face Llama-style and GPT-NeoX decoders.

Independent of meanablate's edge code: every node's output is computed with the model's
own modules (its norms, projections, MLP, ``lm_head``), Hugging Face's own
``apply_rotary_pos_emb`` and torch's ``scaled_dot_product_attention`` with a boolean mask;
a head's output is ``o_proj`` applied to its z with the other heads zeroed, less the bias.
Each destination's input is the *sum of its sources' outputs* (ablated sources swapped for
their ablated values) plus the attention biases so far — not the difference form.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def scaled(model: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """``model`` with random weights large enough that every edge matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif "embed" in name:
                p.copy_(noise)
            else:
                p.copy_(scale * noise)
    return model.eval()


def _parts(model: nn.Module):
    if hasattr(model, "gpt_neox"):
        from transformers.models.gpt_neox import modeling_gpt_neox as mod

        base = model.gpt_neox
        return "neox", base, base.embed_in, base.final_layer_norm, mod.apply_rotary_pos_emb
    from transformers.models.llama import modeling_llama as mod

    base = model.model
    return "llama", base, base.embed_tokens, base.norm, mod.apply_rotary_pos_emb


def node_names(model: nn.Module) -> list[str]:
    c = model.config
    out = ["input"]
    for layer in range(c.num_hidden_layers):
        out += [f"a{layer}.h{h}" for h in range(c.num_attention_heads)] + [f"m{layer}"]
    return out


def _heads(model, layer, x: Tensor, kind: str, cos, sin, rope, mask, which: str) -> Tensor:
    """One projection (``which`` in q/k/v) of every query head, rotated for q and k:
    ``[batch, head, pos, d_head]`` (a shared key/value head repeated per query head)."""
    c = model.config
    b, p, _ = x.shape
    n_h = c.num_attention_heads
    if kind == "neox":
        blk = model.gpt_neox.layers[layer]
        qkv = blk.attention.query_key_value(blk.input_layernorm(x))
        y = qkv.view(b, p, n_h, -1).transpose(1, 2).chunk(3, dim=-1)["qkv".index(which)]
    else:
        blk = model.model.layers[layer]
        proj = getattr(blk.self_attn, f"{which}_proj")
        y = proj(blk.input_layernorm(x)).view(b, p, -1, blk.self_attn.head_dim).transpose(1, 2)
        y = y.repeat_interleave(n_h // y.shape[1], dim=1)
    if which != "v":
        y, _ = rope(y, y, cos, sin)
    return y


def reference_forward(
    model: nn.Module,
    tokens: Tensor,
    mask: Tensor | None,
    ablated: dict[str, Tensor],
    cut: set[tuple[str, str]],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and node outputs with the edges in ``cut`` ((src, dst-input) pairs such as
    ``("m0", "a1.h0<k>")``) carrying ``ablated[src]`` instead of ``src``'s output."""
    kind, base, embed, final_norm, rope = _parts(model)
    c = model.config
    b, p = tokens.shape
    n_h = c.num_attention_heads
    parallel = kind == "neox" and c.use_parallel_residual
    out: dict[str, Tensor] = {"input": embed(tokens)}
    bias = torch.zeros(c.hidden_size, dtype=out["input"].dtype)
    pos = torch.arange(p)[None]
    cos, sin = base.rotary_emb(out["input"], pos)

    def allowed_in(layer: int) -> Tensor:
        """Keys each query may read: causal, the sliding window where the layer has one
        (every layer, or those ``layer_types`` marks), real tokens only."""
        allowed = torch.ones(p, p, dtype=torch.bool).tril()
        sw = getattr(c, "sliding_window", None) if kind == "llama" else None
        types = getattr(c, "layer_types", None)
        if types is not None and types[layer] != "sliding_attention":
            sw = None
        if sw and getattr(c, "use_sliding_window", True):
            i = torch.arange(p)
            allowed = allowed & (i[:, None] - i[None, :] < sw)
        allowed = allowed[None, None].expand(b, 1, p, p)
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, None, :]
        return allowed

    def input_of(dst: str, srcs: dict[str, Tensor], extra: Tensor) -> Tensor:
        total = extra + torch.zeros(b, p, c.hidden_size, dtype=extra.dtype)
        for src, value in srcs.items():
            total = total + (ablated[src] if (src, dst) in cut else value)
        return total

    for layer in range(c.num_hidden_layers):
        blk = base.layers[layer]
        attn = blk.attention if kind == "neox" else blk.self_attn
        o_proj = attn.dense if kind == "neox" else attn.o_proj
        before = dict(out)
        bias_before = bias.clone()
        allowed = allowed_in(layer)
        for h in range(n_h):
            name = f"a{layer}.h{h}"
            qkv = [
                _heads(
                    model,
                    layer,
                    input_of(f"{name}<{w}>", before, bias_before),
                    kind,
                    cos,
                    sin,
                    rope,
                    mask,
                    w,
                )[:, h]
                for w in "qkv"
            ]
            z = F.scaled_dot_product_attention(*qkv, attn_mask=allowed[:, 0])
            z = torch.where(allowed[:, 0].any(-1, keepdim=True), z, 0.0)
            full = torch.zeros(b, p, n_h, z.shape[-1], dtype=z.dtype)
            full[:, :, h] = z
            head_out = o_proj(full.reshape(b, p, -1))
            if o_proj.bias is not None:
                head_out = head_out - o_proj.bias
            out[name] = head_out
        if o_proj.bias is not None:
            bias = bias + o_proj.bias
        if parallel:
            x = input_of(f"m{layer}", before, bias_before)
        else:
            x = input_of(f"m{layer}", out, bias)
        out[f"m{layer}"] = blk.mlp(blk.post_attention_layernorm(x))
    logits = model.lm_head(final_norm(input_of("logits", out, bias)))
    return logits, out


def values(model: nn.Module, batch: dict, kind: str) -> dict[str, Tensor]:
    """What ablated edges carry: zero, the mean over real tokens, or the corrupted run's."""
    tokens, mask = batch["tokens"], batch.get("attention_mask")
    if kind == "counterfactual":
        return reference_forward(model, batch["corrupt"], mask, {}, set())[1]
    _, outs = reference_forward(model, tokens, mask, {}, set())
    if kind == "zero":
        return {k: torch.zeros_like(v) for k, v in outs.items()}
    real = torch.ones(tokens.shape, dtype=torch.bool) if mask is None else mask.bool()
    return {k: v[real].mean(0) for k, v in outs.items()}
