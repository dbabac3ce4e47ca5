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

from meanablate.sites import Site, as_sites

__all__ = ["reverse_topological", "transformer_units", "unit_kind", "unit_layer"]

Granularity = Literal["heads", "mlps", "components", "neurons", "layers", "positions"]
_LAYER_RE = re.compile(r"(?:^|\.)(?:blocks|h|layer|layers)\.(\d+)(?:\.|$)")


def _cfg(model: nn.Module) -> object:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "n_layers") or not hasattr(cfg, "n_heads"):
        raise TypeError(
            f"{type(model).__name__} has no TransformerLens-style cfg; list its "
            "units as sites instead (e.g. 'transformer.h.0.mlp.act[neurons=3]')"
        )
    return cfg


def transformer_units(
    model: nn.Module,
    granularity: Granularity = "components",
    *,
    layers: Iterable[int] | None = None,
    n_positions: int | None = None,
) -> list[str]:
    """Unit site strings of a TransformerLens-style model (``model.cfg``).

    ``heads``: ``blocks.L.attn.hook_z[heads=h]``; ``mlps``: ``blocks.L.hook_mlp_out``;
    ``components``: heads and MLPs; ``neurons``: ``blocks.L.mlp.hook_post[neurons=i]``;
    ``layers``: ``blocks.L.hook_attn_out`` and ``blocks.L.hook_mlp_out``;
    ``positions``: ``blocks.L.hook_resid_pre[pos=p]`` (needs ``n_positions``).

    >>> import meanablate as ma
    >>> from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
    >>> model = HookedTransformer(TransformerConfig(n_layers=1, d_model=8, n_heads=2,
    ...     d_head=4, d_mlp=16, d_vocab=5, n_ctx=4))
    >>> ma.transformer_units(model)
    ['blocks.0.attn.hook_z[heads=0]', 'blocks.0.attn.hook_z[heads=1]', 'blocks.0.hook_mlp_out']
    """
    cfg = _cfg(model)
    n_layers = int(cfg.n_layers)  # type: ignore[attr-defined]
    chosen = range(n_layers) if layers is None else list(layers)
    for layer in chosen:
        if not 0 <= layer < n_layers:
            raise IndexError(f"layer {layer} out of range for a model with {n_layers} layers")
    d_mlp = getattr(cfg, "d_mlp", None)
    out: list[str] = []
    for layer in chosen:
        if granularity in ("heads", "components"):
            out += [f"blocks.{layer}.attn.hook_z[heads={h}]" for h in range(cfg.n_heads)]  # type: ignore[attr-defined]
        if granularity in ("mlps", "components") and d_mlp:
            out.append(f"blocks.{layer}.hook_mlp_out")
        if granularity == "neurons":
            if not d_mlp:
                raise ValueError("the model has no MLPs, so no neurons")
            out += [f"blocks.{layer}.mlp.hook_post[neurons={i}]" for i in range(d_mlp)]
        if granularity == "layers":
            out.append(f"blocks.{layer}.hook_attn_out")
            if d_mlp:
                out.append(f"blocks.{layer}.hook_mlp_out")
        if granularity == "positions":
            if n_positions is None:
                raise ValueError("positions granularity needs n_positions")
            out += [f"blocks.{layer}.hook_resid_pre[pos={p}]" for p in range(n_positions)]
    if granularity not in ("heads", "mlps", "components", "neurons", "layers", "positions"):
        raise ValueError(f"unknown granularity {granularity!r}")
    return out


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
    module = as_sites(unit)[0].module
    m = _LAYER_RE.search(module)
    rest = module[m.end() :] if m else module
    return next((stage for word, stage in _STAGES if word in rest), 6)


def reverse_topological(units: Sequence[str]) -> list[str]:
    """Units from the output backwards: later layers first, and within a layer the order
    of the forward pass reversed (resid_post, MLP, resid_mid, attention, resid_pre)."""
    return sorted(units, key=lambda u: (unit_layer(u), _order_in_layer(u)), reverse=True)
