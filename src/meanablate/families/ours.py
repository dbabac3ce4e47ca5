"""Our :class:`~meanablate.organisms.transformer.HookedTransformer` (TransformerLens names).

Heads: ``blocks.L.attn.hook_z`` ``[batch, pos, head, d_head]`` (also ``hook_q``/``k``/``v``
and ``hook_result``); neurons: ``blocks.L.mlp.hook_post`` ``[batch, pos, d_mlp]``; blocks
are ``blocks`` and are called as ``block(resid, key_mask)``; the tail is ``unembed``.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from meanablate.families import register
from meanablate.families.base import (
    GRANULARITIES,
    Family,
    Granularity,
    HeadLayout,
    LinearWrite,
    UnitInfo,
    check_heads,
    stock_modules,
)
from meanablate.sites import Site

__all__ = ["Ours"]

_PATH = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HEAD_AXIS = ("attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_result")
# [batch, head, q, k]: the head axis is dim 1, which a heads= selector does not index.
_HEAD_FIRST = ("attn.hook_pattern", "attn.hook_attn_scores")
_KINDS = {
    "attn.hook_z": "head",
    "mlp.hook_post": "neuron",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "hook_resid_pre": "resid",
    "hook_resid_mid": "resid",
    "hook_resid_post": "resid",
}


def _layers(chosen: list[int] | None, n_layers: int) -> list[int]:
    out = list(range(n_layers)) if chosen is None else list(chosen)
    for layer in out:
        if not 0 <= layer < n_layers:
            raise IndexError(f"layer {layer} out of range for a model with {n_layers} layers")
    return out


@register
class Ours(Family):
    """:class:`~meanablate.organisms.transformer.HookedTransformer` (our organisms)."""

    name = "ours"

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        from meanablate.organisms.transformer import HookedTransformer

        return isinstance(model, HookedTransformer)

    @property
    def cfg(self):  # type: ignore[no-untyped-def]
        return self.model.cfg

    def blocks(self) -> tuple[str, nn.ModuleList]:
        return "blocks", self.model.blocks  # type: ignore[return-value]

    def _split(self, site: Site) -> tuple[int | None, str]:
        m = _PATH.match(site.module)
        if not m or int(m.group(1)) >= self.cfg.n_layers:
            return None, site.module
        return int(m.group(1)), m.group(2) if site.io == "output" else m.group(2) + "@input"

    def unit_info(self, site: Site) -> UnitInfo:
        layer, rest = self._split(site)
        heads = None
        if rest in _HEAD_AXIS:
            heads = HeadLayout(self.cfg.n_heads, self.cfg.d_head, flat=False)
        return UnitInfo(layer, _KINDS.get(rest, "other"), heads)  # type: ignore[arg-type]

    def check_site(self, site: Site) -> Site:
        if site.heads is None:
            return site
        layer, rest = self._split(site)
        hint = None if layer is None else f"blocks.{layer}.attn.hook_z[heads=h]"
        if rest in _HEAD_FIRST and site.n_heads is None:
            raise ValueError(
                f"site {site}: {site.key} is [batch, head, query, key]; heads= indexes "
                f"dim -2 (the query position) there; ablate heads at {hint}"
            )
        return check_heads(site, self.unit_info(site).heads, hint=hint)

    def units(
        self,
        granularity: Granularity = "components",
        *,
        layers: list[int] | None = None,
        n_positions: int | None = None,
    ) -> list[str]:
        cfg = self.cfg
        return tl_style_units(
            cfg.n_layers, cfg.n_heads, cfg.d_mlp, granularity, layers, n_positions
        )

    def can_resume(self) -> bool:
        # A subclass of the user's (another forward, another unembedding) runs in full.
        return stock_modules(self.model, ("meanablate", "torch"))

    def tail(self, hidden: Tensor) -> Tensor:
        return self.model.unembed(hidden)  # type: ignore[operator]

    def linear_write(self, site: Site) -> LinearWrite | None:
        layer, rest = self._split(site)
        if layer is None:
            return None
        block = self.model.blocks[layer]  # type: ignore[index]
        enters = "mid" if self.cfg.d_mlp is not None else "post"
        if rest == "attn.hook_z":
            return LinearWrite(block.attn.W_O, layer, enters)  # type: ignore[arg-type]
        if rest == "mlp.hook_post":
            return LinearWrite(block.mlp.W_out, layer, "post")
        return None


def tl_style_units(
    n_layers: int,
    n_heads: int,
    d_mlp: int | None,
    granularity: str,
    layers: list[int] | None,
    n_positions: int | None,
) -> list[str]:
    """Units named as in TransformerLens (``blocks.L.attn.hook_z[heads=h]``, ...)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; use one of {GRANULARITIES}")
    out: list[str] = []
    for layer in _layers(layers, n_layers):
        if granularity in ("heads", "components"):
            out += [f"blocks.{layer}.attn.hook_z[heads={h}]" for h in range(n_heads)]
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
    return out
