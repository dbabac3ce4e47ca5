"""The one description of a model family that every feature reads.

A :class:`Family` says, for one kind of model, where its blocks are, how an attention
activation lays out its heads, which activations are MLP neurons, what each unit writes
into the residual stream, and how the stream becomes logits. Sites, means, unit listing,
the fast path and (next) edges consume it; none of them guesses from tensor shapes.

A model of no known family gets :class:`~meanablate.families.generic.Generic`: plain
module hooks, no head axis unless the site says ``n_heads=`` explicitly.

Implementations live one per module (``ours``, ``hf_gpt2``, ``hf_neox``, ``hf_llama``,
``hf_bert``, ``tl_bridge``, ``generic``) and register in :mod:`meanablate.families`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from meanablate.sites import Site

__all__ = ["Family", "HeadLayout", "LinearWrite", "UnitInfo", "check_heads", "stock_modules"]

Granularity = Literal["heads", "mlps", "components", "neurons", "layers", "positions"]
GRANULARITIES = ("heads", "mlps", "components", "neurons", "layers", "positions")
UnitKind = Literal["head", "neuron", "attn_out", "mlp_out", "resid", "other"]


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads of an attention activation are, as a hook function sees it.

    ``flat``: the activation is ``[batch, pos, n_heads * d_head]`` (HF GPT-2's
    ``attn.c_proj`` input, a TransformerLens-4 bridge's raw ``hook_z``) and is viewed as
    ``[batch, pos, n_heads, d_head]``; otherwise the head axis is dim ``-2`` already.
    """

    n_heads: int
    d_head: int
    flat: bool


@dataclass(frozen=True)
class LinearWrite:
    """How a unit's activation enters the residual stream: ``delta = (fill - act) @ W``.

    ``weight``: ``[n_units, d_unit, d_model]`` for heads (``W_O`` per head) or
    ``[d_mlp, d_model]`` for neurons. ``layer``/``enters``: the stream the delta is added
    to — ``"post"`` (after block ``layer``; run from ``layer + 1``), ``"mid"`` (between the
    attention and MLP halves of block ``layer``) or ``"norm"`` (post-LN encoders: before
    block ``layer``'s layer norm, which then must re-run).
    """

    weight: Tensor
    layer: int
    enters: Literal["post", "mid", "norm"]


@dataclass(frozen=True)
class UnitInfo:
    """What a family knows about one site: its layer, kind and head layout."""

    layer: int | None
    kind: UnitKind
    heads: HeadLayout | None


class Family:
    """Base class: one subclass per model family (see the module docstring).

    ``model`` is the user's model (an nnsight wrapper is unwrapped by
    :func:`meanablate.families.family_of`); nothing here may replace a method on it,
    register a hook outside a context manager, or change a weight.
    """

    name: ClassVar[str] = "base"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family."""
        raise NotImplementedError

    # -- structure ----------------------------------------------------------------
    def blocks(self) -> tuple[str, nn.ModuleList] | None:
        """The path and list of the residual blocks, in forward order (``None``: unknown)."""
        return None

    def unit_info(self, site: Site) -> UnitInfo:
        """Layer, kind and head layout of ``site``'s activation."""
        return UnitInfo(None, "other", None)

    def check_site(self, site: Site) -> Site:
        """``site`` with what the family knows filled in (``n_heads`` of a flat head
        activation), or a ``ValueError``/``IndexError`` that says what to write instead:
        ``heads=`` on an activation with no head axis, a head index out of range."""
        return site

    def units(
        self,
        granularity: Granularity = "components",
        *,
        layers: list[int] | None = None,
        n_positions: int | None = None,
    ) -> list[str]:
        """Unit site strings at ``granularity`` (see :func:`meanablate.transformer_units`)."""
        raise TypeError(
            f"{type(self.model).__name__} is of no known model family; list its units "
            "as sites (e.g. 'mlp.act[neurons=3]', 'attn.out@input[heads=1;n_heads=4]')"
        )

    # -- resuming from a block (the sweep's layer skipping) --------------------------
    def can_resume(self) -> bool:
        """Whether running blocks ``L..`` with their recorded call arguments and then
        :meth:`tail` gives exactly what the model's own forward gives (known families)."""
        return False

    def resume_call(
        self, args: tuple, kwargs: dict[str, Any], *, block: int | None = None
    ) -> tuple[tuple, dict] | None:
        """A block's recorded call made safe to repeat (e.g. a key/value cache that the
        clean run filled dropped), or ``None`` when it cannot be repeated. ``block``: the
        index of the block being called (recorded calls always give it)."""
        return args, kwargs

    def block_output(self, out: Any) -> Tensor:
        """The residual stream a block returns (first element of a tuple)."""
        if isinstance(out, tuple):
            out = out[0]
        if not isinstance(out, Tensor):
            raise TypeError(f"a block returned {type(out).__name__}, not a tensor")
        return out

    # -- the fast path ------------------------------------------------------------
    def linear_write(self, site: Site) -> LinearWrite | None:
        """How ``site``'s units write into the residual stream (``None``: not linearly)."""
        return None

    def stream_key(self, write: LinearWrite) -> str | None:
        """The activation key (``module@input``) that :meth:`finish_block` needs for a
        ``"mid"`` or ``"norm"`` neuron write, recorded in the clean run (``None``: not
        known)."""
        return None

    def finish_block(self, write: LinearWrite, z: Tensor, stream: Tensor) -> Tensor:
        """Block ``write.layer``'s output from the units' ablated activation ``z`` and the
        clean run's tensor at :meth:`stream_key`: the block's remaining modules, called as
        its forward calls them (so equal to the hooked forward's bits)."""
        raise NotImplementedError

    def finish_heads(self, write: LinearWrite, z: Tensor, block_input: Tensor) -> Tensor:
        """Block ``write.layer``'s output from the heads' ablated activation ``z`` (the
        output projection's input, ``[batch, pos, n_heads * d_head]``) and the block's
        recorded input: the projection, the residual add and the MLP half, each as the
        block's own forward computes it (so equal to the hooked forward's bits)."""
        raise NotImplementedError

    def tail(self, hidden: Tensor) -> Tensor:
        """Final norm + unembedding: the last block's output -> the model's logits."""
        raise NotImplementedError

    def block_at(
        self, index: int, args: tuple, kwargs: dict[str, Any], positions: Tensor
    ) -> Tensor | None:
        """Block ``index``'s output ``[batch, len(positions), d_model]`` at ``positions``
        only (1-D indices), from its recorded call ``(args, kwargs)`` whose first
        positional argument is the stream ``[batch, pos, d_model]``: queries and the rest
        of the block at ``positions``, keys and values from every position. Equal to the
        block's output there up to float rounding; ``None``: not known here (the caller
        runs the whole block and cuts its output)."""
        return None

    def scored_positions(self, batch: Any) -> Tensor | None:
        """Bool ``[batch, pos]`` of the positions a task metric reads by default
        (masked LMs: the mask tokens); ``None``: the metric's own default."""
        return None


def check_heads(site: Site, layout: HeadLayout | None, *, hint: str | None) -> Site:
    """Check ``site``'s ``heads=`` against the activation's ``layout`` (from the config).

    A flat head activation gets ``n_heads`` filled in (and an explicit one must match the
    config); a head index past the config's count is an ``IndexError``; ``heads=`` on an
    activation without a head axis (and without an explicit ``n_heads`` view) is a
    ``ValueError`` naming ``hint``, the site to write instead.
    """
    if site.heads is None:
        return site
    if layout is None:
        if site.n_heads is not None:
            return site  # an explicit flat view the user asked for
        instead = f"; the heads of this layer are at {hint}" if hint else ""
        raise ValueError(
            f"site {site}: {site.key} has no head axis, so heads= would index another "
            f"dimension (positions){instead} (or list them with "
            "transformer_units(model, 'heads'))"
        )
    if layout.flat:
        if site.n_heads is not None and site.n_heads != layout.n_heads:
            raise ValueError(
                f"site {site}: n_heads={site.n_heads}, but the model's config has "
                f"{layout.n_heads} heads here; drop n_heads (it is read from the config)"
            )
    elif site.n_heads is not None:
        raise ValueError(
            f"site {site}: {site.key} already has a head axis "
            f"[batch, pos, {layout.n_heads}, {layout.d_head}]; drop n_heads"
        )
    if max(site.heads) >= layout.n_heads:
        raise IndexError(
            f"site {site}: head {max(site.heads)} out of range; the model has "
            f"{layout.n_heads} heads here (0..{layout.n_heads - 1})"
        )
    if layout.flat and site.n_heads is None:
        return site.with_units(n_heads=layout.n_heads)
    return site


def stock_modules(model: nn.Module, packages: tuple[str, ...]) -> bool:
    """Whether every module of ``model`` is of a class defined in ``packages`` (e.g.
    ``("transformers", "torch")``): no subclass or swapped-in module of the user's own,
    whose forward a family's shortcut (resume, tail, linear write) would not mirror.

    >>> stock_modules(nn.Sequential(nn.Linear(2, 2)), ("torch",))
    True
    """
    return all(type(m).__module__.split(".")[0] in packages for m in model.modules())
