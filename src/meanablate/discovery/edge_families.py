"""Edge descriptions of other model families, by exact conversion to our transformer.

A Hugging Face GPT-2 (``GPT2LMHeadModel``) computes exactly what a pre-LN
:class:`~meanablate.organisms.transformer.HookedTransformer` with its weights computes
(learned positions, LayerNorm, ``gelu_new`` = tanh-approximated GELU, tied unembedding,
``1/sqrt(d_head)`` attention scale), so the edge layer runs on such a copy: ``c_attn``'s
columns split into per-head ``W_Q``/``W_K``/``W_V``, ``c_proj``'s rows into per-head
``W_O``. The copy is checked against the Hugging Face forward when it is made; a model
whose configuration departs from plain GPT-2 (another activation, scaled or upcast
attention, untied head) is refused with the setting named.

A TransformerLens 4 ``TransformerBridge`` of a GPT-2-like architecture (over Hugging Face
GPT-2, or TransformerLens's ``NativeModel`` over our transformer) is copied the same way from
its TL-format weights (``bridge.get_params()``, through
:func:`~meanablate.adapters.transformer_lens.from_transformer_bridge`) and checked against
the bridge's own forward. Bridges over Llama-style and NeoX models (RMSNorm, rotary,
gated MLP) need no copy: :mod:`~meanablate.discovery.edge_hf` reads the Hugging Face
modules they wrap.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from meanablate.organisms.transformer import HookedTransformer, TransformerConfig

__all__ = ["bridge_as_hooked", "gpt2_as_hooked", "is_hf_gpt2"]


def is_hf_gpt2(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) == "gpt2" and hasattr(model, "transformer")


def _refuse(what: str) -> None:
    raise ValueError(f"edges on this GPT-2 need plain GPT-2 settings: {what}")


@torch.no_grad()
def gpt2_as_hooked(model: nn.Module) -> HookedTransformer:
    """An exact :class:`HookedTransformer` copy of a Hugging Face GPT-2 LM head model."""
    hf = model.config
    if hf.activation_function != "gelu_new":
        _refuse(f"activation_function={hf.activation_function!r} (needs 'gelu_new')")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(hf, flag, False):
            _refuse(f"{flag}=True")
    if not getattr(hf, "scale_attn_weights", True):
        _refuse("scale_attn_weights=False")
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None:
        _refuse("no lm_head (use GPT2LMHeadModel)")
    tr = model.transformer
    d, h = hf.n_embd, hf.n_head
    dh = d // h
    cfg = TransformerConfig(
        n_layers=hf.n_layer,
        d_model=d,
        n_heads=h,
        d_head=dh,
        d_vocab=hf.vocab_size,
        n_ctx=hf.n_positions,
        d_mlp=hf.n_inner or 4 * d,
        act_fn="gelu",
        normalization="LN",
        eps=hf.layer_norm_epsilon,
    )
    out = HookedTransformer(cfg).to(device=tr.wte.weight.device, dtype=tr.wte.weight.dtype)
    out.W_E.copy_(tr.wte.weight)
    out.W_pos.copy_(tr.wpe.weight)
    for i, blk in enumerate(tr.h):
        mine = out.blocks[i]
        mine.ln1.w.copy_(blk.ln_1.weight)
        mine.ln1.b.copy_(blk.ln_1.bias)
        w, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias  # [d, 3d]: x @ w + b
        for j, (W, B) in enumerate(
            (
                (mine.attn.W_Q, mine.attn.b_Q),
                (mine.attn.W_K, mine.attn.b_K),
                (mine.attn.W_V, mine.attn.b_V),
            )
        ):
            W.copy_(w[:, j * d : (j + 1) * d].reshape(d, h, dh).permute(1, 0, 2))
            B.copy_(b[j * d : (j + 1) * d].reshape(h, dh))
        mine.attn.W_O.copy_(blk.attn.c_proj.weight.reshape(h, dh, d))
        mine.attn.b_O.copy_(blk.attn.c_proj.bias)
        mine.ln2.w.copy_(blk.ln_2.weight)
        mine.ln2.b.copy_(blk.ln_2.bias)
        mine.mlp.W_in.copy_(blk.mlp.c_fc.weight)
        mine.mlp.b_in.copy_(blk.mlp.c_fc.bias)
        mine.mlp.W_out.copy_(blk.mlp.c_proj.weight)
        mine.mlp.b_out.copy_(blk.mlp.c_proj.bias)
    out.ln_final.w.copy_(tr.ln_f.weight)
    out.ln_final.b.copy_(tr.ln_f.bias)
    out.W_U.copy_(lm_head.weight.T)
    if getattr(lm_head, "bias", None) is not None:
        out.b_U.copy_(lm_head.bias)
    else:
        out.b_U.zero_()
    out.eval()
    _check_same(model, out)
    return out


@torch.no_grad()
def bridge_as_hooked(bridge: nn.Module) -> HookedTransformer:
    """An exact :class:`HookedTransformer` copy of a GPT-2-like TransformerLens bridge."""
    from meanablate.adapters.transformer_lens import from_transformer_bridge

    try:
        out = from_transformer_bridge(bridge)
    except (ValueError, KeyError, AttributeError, NotImplementedError) as exc:
        raise ValueError(
            f"edges on a TransformerBridge need a GPT-2-like architecture (LayerNorm or none, "
            f"learned positions, one MLP): {exc}"
        ) from None
    p = next(bridge.parameters())
    out = out.to(device=p.device, dtype=p.dtype).eval()
    _check_same(bridge, out, "TransformerBridge")
    return out


def _check_same(model: Any, copy: HookedTransformer, what: str = "GPT-2") -> None:
    """The copy's logits equal the model's own forward's on a few random tokens."""
    gen = torch.Generator().manual_seed(0)
    n = min(8, copy.cfg.n_ctx)
    tokens = torch.randint(0, copy.cfg.d_vocab, (2, n), generator=gen).to(copy.W_E.device)
    want = model(input_ids=tokens).logits if what == "GPT-2" else model(tokens)
    got = copy(tokens)
    scale = float(want.abs().max()) + 1.0
    if not torch.allclose(got, want, atol=1e-4 * scale, rtol=1e-4):
        raise ValueError(
            f"the {what} copy for edges does not reproduce the model's logits (max difference "
            f"{float((got - want).abs().max()):.3g}); edges are not available for this model"
        )
