"""Models of no known family: plain module hooks, every head layout explicit.

Sites name any module's output or input; ``heads=`` needs ``n_heads=`` (the flat
``[..., n_heads * d_head]`` view) unless the activation is 4-d ``[batch, pos, head,
d_head]`` (checked when it is seen). The sweep runs the full hooked forward per unit.
A model with a TransformerLens-style ``cfg`` (``n_layers``, ``n_heads``) lists its units
with TransformerLens names.
"""

from __future__ import annotations

from torch import nn

from meanablate.families.base import Family, Granularity

__all__ = ["Generic"]


class Generic(Family):
    """The fallback family (not registered: :func:`family_of` returns it last)."""

    name = "generic"

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        return True

    def units(
        self,
        granularity: Granularity = "components",
        *,
        layers: list[int] | None = None,
        n_positions: int | None = None,
    ) -> list[str]:
        from meanablate.families.ours import tl_style_units

        cfg = getattr(self.model, "cfg", None)
        if cfg is None or not hasattr(cfg, "n_layers") or not hasattr(cfg, "n_heads"):
            return super().units(granularity, layers=layers, n_positions=n_positions)
        return tl_style_units(
            int(cfg.n_layers),
            int(cfg.n_heads),
            getattr(cfg, "d_mlp", None),
            granularity,
            layers,
            n_positions,
        )
