"""What a TransformerLens hook name is called on a Hugging Face model.

Used only to write a better error: ``blocks.0.attn.hook_z`` on a GPT-2 is
``transformer.h.0.attn.c_proj@input[heads=..;n_heads=12]``. The tables follow the
modules' own forward code (GPT2Block, GPTNeoXLayer, LlamaDecoderLayer, BertLayer): each
site is the module (or module input) that carries the same activation as TL's hook.
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["tl_equivalent"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")

_FUSED = ("{b}.attn.c_attn", "{b}.attention.query_key_value")  # GPT-2, GPT-NeoX

# TL hook (inside a block) -> one template per HF layout; {b} is the block's path.
_IN_BLOCK: dict[str, tuple[str, ...]] = {
    "attn.hook_z": (
        "{b}.attn.c_proj@input",  # GPT-2
        "{b}.attention.dense@input",  # GPT-NeoX
        "{b}.self_attn.o_proj@input",  # Llama
        "{b}.attention.output.dense@input",  # BERT
    ),
    # BERT's first: its `attention` also holds the LayerNorm and the residual.
    "hook_attn_out": ("{b}.attention.output.dense", "{b}.attn", "{b}.attention", "{b}.self_attn"),
    "attn.hook_q": ("{b}.self_attn.q_proj", "{b}.attention.self.query", *_FUSED),
    "attn.hook_k": ("{b}.self_attn.k_proj", "{b}.attention.self.key", *_FUSED),
    "attn.hook_v": ("{b}.self_attn.v_proj", "{b}.attention.self.value", *_FUSED),
    "mlp.hook_post": (
        "{b}.mlp.c_proj@input",
        "{b}.mlp.dense_4h_to_h@input",
        "{b}.mlp.down_proj@input",
        "{b}.intermediate",
    ),
    "mlp.hook_pre": ("{b}.mlp.c_fc", "{b}.mlp.dense_h_to_4h", "{b}.intermediate.dense"),
    "hook_mlp_out": ("{b}.mlp", "{b}.output.dense"),
    "hook_resid_pre": ("{b}@input",),
    "hook_resid_post": ("{b}",),
    "ln1.hook_normalized": ("{b}.ln_1", "{b}.input_layernorm"),
    "ln2.hook_normalized": ("{b}.ln_2", "{b}.post_attention_layernorm"),
}
_BLOCK_LISTS = (
    "transformer.h",
    "h",
    "gpt_neox.layers",
    "model.layers",
    "layers",
    "bert.encoder.layer",
    "encoder.layer",
)
_TOP: dict[str, tuple[str, ...]] = {
    "hook_embed": ("transformer.wte", "wte", "gpt_neox.embed_in", "model.embed_tokens"),
    "hook_pos_embed": ("transformer.wpe", "wpe"),
    "ln_final.hook_normalized": (
        "transformer.ln_f",
        "ln_f",
        "gpt_neox.final_layer_norm",
        "model.norm",
    ),
    "unembed": ("lm_head", "embed_out"),
}
_HEADS = ("attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v")


def _n_heads(model: nn.Module, hook: str) -> int | None:
    cfg = getattr(model, "config", None)
    names = ("n_head", "num_attention_heads")
    if hook in ("attn.hook_k", "attn.hook_v"):  # grouped-query attention: fewer k/v heads
        names = ("num_key_value_heads", *names)
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def tl_equivalent(model: nn.Module, path: str) -> str | None:
    """The site on ``model`` that carries TL's hook ``path``, or ``None`` if unknown."""
    modules = dict(model.named_modules())
    m = _BLOCK.match(path)
    if m:
        layer, hook = m.group(1), m.group(2)
        templates = _IN_BLOCK.get(hook, ())
        for blocks in _BLOCK_LISTS:
            b = f"{blocks}.{layer}"
            if b not in modules:
                continue
            for t in templates:
                site = t.format(b=b)
                if site.removesuffix("@input") in modules:
                    return _with_selector(model, hook, site)
        return None
    for site in _TOP.get(path, ()):
        if site in modules:
            return site
    return None


def _with_selector(model: nn.Module, hook: str, site: str) -> str:
    if hook not in _HEADS:
        return site
    if site.endswith(("c_attn", "query_key_value")):
        return f"{site} (q, k and v fused in one [batch, pos, 3*d_model] output)"
    n = _n_heads(model, hook)
    return f"{site}[heads=..;n_heads={n}]" if n else f"{site}[heads=..;n_heads=N]"
