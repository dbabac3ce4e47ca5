"""Units for discovery: heads, MLPs, neurons, layers, positions — as site strings.

Discovery works on any list of sites; these helpers enumerate the usual granularities
of a TransformerLens-style model (our organisms), and order units from the output
backwards (the order ACDC walks them in).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

from torch import nn

from meanablate._unwrap import unwrap
from meanablate.sites import Site, as_sites

__all__ = ["reverse_topological", "transformer_units", "unit_kind", "unit_layer"]

Granularity = Literal["heads", "mlps", "components", "neurons", "layers", "positions"]
_LAYER_RE = re.compile(r"(?:^|\.)(?:blocks|h|layer|layers)\.(\d+)(?:\.|$)")


def transformer_units(
    model: nn.Module,
    granularity: Granularity = "components",
    *,
    layers: Iterable[int] | None = None,
    n_positions: int | None = None,
) -> list[str]:
    """Unit site strings of a transformer of any known family, at ``granularity``.

    ``heads``: one site per attention head; ``mlps``: each MLP's output; ``components``:
    heads and MLPs; ``neurons``: each MLP neuron; ``layers``: each attention and MLP
    output; ``positions``: the residual stream entering each block, per position (needs
    ``n_positions``). Names follow the family (head counts come from its config):

    - ours / TransformerLens-style ``cfg``: ``blocks.L.attn.hook_z[heads=h]``,
      ``blocks.L.hook_mlp_out``, ``blocks.L.mlp.hook_post[neurons=i]``,
      ``blocks.L.hook_resid_pre[pos=p]``;
    - HF GPT-2: ``transformer.h.L.attn.c_proj@input[heads=h]``, ``transformer.h.L.mlp``,
      ``transformer.h.L.mlp.act[neurons=i]``, ``transformer.h.L@input[pos=p]``;
    - HF GPT-NeoX: ``gpt_neox.layers.L.attention.dense@input[heads=h]``,
      ``gpt_neox.layers.L.mlp.dense_4h_to_h@input[neurons=i]``;
    - HF Llama-style: ``model.layers.L.self_attn.o_proj@input[heads=h]``,
      ``model.layers.L.mlp.down_proj@input[neurons=i]``;
    - HF BERT: ``bert.encoder.layer.L.attention.output.dense@input[heads=h]``,
      ``bert.encoder.layer.L.intermediate[neurons=i]``.

    >>> from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
    >>> cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=6)
    >>> transformer_units(HookedTransformer(cfg), "heads")
    ['blocks.0.attn.hook_z[heads=0]', 'blocks.0.attn.hook_z[heads=1]']
    """
    model = unwrap(model)
    from meanablate.families import family_of

    chosen = None if layers is None else list(layers)
    return family_of(model).units(granularity, layers=chosen, n_positions=n_positions)


def unit_layer(unit: Site | str) -> int:
    """The layer index in a unit's module path (``blocks.3...`` -> 3; none -> -1)."""
    site = as_sites(unit)[0]
    m = _LAYER_RE.search(site.module)
    return int(m.group(1)) if m else -1


def unit_kind(unit: Site | str) -> str:
    """``head``, ``mlp``, ``neuron``, ``attn``, ``resid``, ``position`` or ``other``."""
    site = as_sites(unit)[0]
    if site.heads is not None:
        return "head"
    if site.neurons is not None:
        return "neuron"
    if site.positions is not None:
        return "position"
    last = site.module.rsplit(".", 1)[-1]
    if "mlp" in last:
        return "mlp"
    if "attn" in last:
        return "attn"
    if "resid" in last:
        return "resid"
    return "other"


# Where a block's modules run, in order (first match wins: "attn_out" before "attn").
_STAGES = (
    ("resid_pre", 0),
    ("ln1", 1),
    ("attn_in", 1),
    ("attn_out", 3),
    ("attn", 2),
    ("attention", 2),
    ("resid_mid", 4),
    ("ln2", 5),
    ("mlp_in", 5),
    ("mlp_out", 7),
    ("mlp", 6),
    ("resid_post", 8),
)


def _order_in_layer(unit: str) -> int:
    # The stage of the unit's module within its block, read from the module path (the
    # selector says nothing about it: "hook_mlp_out[pos=2]" is an MLP output, and
    # "attn.hook_z" with no heads is attention); anything else counts as the MLP.
    site = as_sites(unit)[0]
    module = site.module
    m = _LAYER_RE.search(module)
    rest = module[m.end() :] if m else module
    if m and not rest:  # the block itself (HF ``h.L@input``): its input or output stream
        return 0 if site.io == "input" else 8
    return next((stage for word, stage in _STAGES if word in rest), 6)


def reverse_topological(units: Sequence[str]) -> list[str]:
    """Units from the output backwards: later layers first, and within a layer the order
    of the forward pass reversed (resid_post, MLP, resid_mid, attention, resid_pre)."""
    return sorted(units, key=lambda u: (unit_layer(u), _order_in_layer(u)), reverse=True)
