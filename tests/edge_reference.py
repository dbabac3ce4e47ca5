"""Hand-written references for edge tests, independent of meanablate's edge code.

The reference forward keeps a dict of every node's output and rebuilds each destination's
input as the *sum of its sources' outputs* (ablated sources swapped for their ablated
values) plus the constant attention biases — not the difference form the library uses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from meanablate.organisms.transformer import HookedTransformer, TransformerConfig


def random_model(cfg: TransformerConfig, seed: int, scale: float = 0.4) -> HookedTransformer:
    torch.manual_seed(seed)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w",)):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model.eval()


def node_names(cfg: TransformerConfig) -> list[str]:
    out = ["input"]
    for layer in range(cfg.n_layers):
        out += [f"a{layer}.h{h}" for h in range(cfg.n_heads)]
        if cfg.d_mlp:
            out.append(f"m{layer}")
    return out


def reference_forward(
    model: HookedTransformer,
    tokens: Tensor,
    mask: Tensor | None,
    ablated: dict[str, Tensor],
    cut: set[tuple[str, str]],
    split_qkv: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and node outputs with the edges in ``cut`` ((src, dst-input) pairs, e.g.
    ``("m0", "a1.h0<k>")``) carrying ``ablated[src]`` instead of ``src``'s output."""
    cfg = model.cfg
    out: dict[str, Tensor] = {"input": model.W_E[tokens] + model.W_pos[: tokens.shape[1]]}
    biases = torch.zeros(cfg.d_model)

    def input_of(dst: str) -> Tensor:
        total = biases + torch.zeros(*tokens.shape, cfg.d_model)
        for src, value in out.items():
            total = total + (ablated[src] if (src, dst) in cut else value)
        return total

    n = tokens.shape[1]
    for layer in range(cfg.n_layers):
        block = model.blocks[layer]
        attn = block.attn
        new: dict[str, Tensor] = {}
        for h in range(cfg.n_heads):
            name = f"a{layer}.h{h}"
            xs = [input_of(f"{name}<{c}>" if split_qkv else name) for c in "qkv"]
            q = block.ln1(xs[0]) @ attn.W_Q[h] + attn.b_Q[h]
            k = block.ln1(xs[1]) @ attn.W_K[h] + attn.b_K[h]
            v = block.ln1(xs[2]) @ attn.W_V[h] + attn.b_V[h]
            scores = q @ k.transpose(-1, -2) / cfg.d_head**0.5
            if cfg.causal:
                scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
            if mask is not None:
                scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
            pattern = torch.softmax(scores, -1).nan_to_num(0.0)
            new[name] = pattern @ v @ attn.W_O[h]
        out.update(new)
        biases = biases + attn.b_O
        if cfg.d_mlp:
            x = input_of(f"m{layer}")
            out[f"m{layer}"] = block.mlp(block.ln2(x))
    return model.unembed(input_of("logits")), out
