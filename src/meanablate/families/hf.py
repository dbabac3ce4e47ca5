"""What the Hugging Face families share: a base model found by class name, sites named
from per-family templates, the config's head counts, and resuming from a decoder layer.

Each family (``hf_gpt2``, ``hf_neox``, ``hf_llama``, ``hf_bert``) fills in the templates
below, relative to its base model (``transformer``, ``gpt_neox``, ``model``, ``bert``);
``transformers`` is never imported here (the model's classes are recognised by name).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from torch import Tensor, nn

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

__all__ = ["HFFamily"]


def _class_names(obj: object) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


class HFFamily(Family):
    """A Hugging Face family: subclasses set the class attributes (templates use ``{L}``).

    ``heads``: the activation holding the heads' outputs concatenated (input of the
    attention output projection, ``[batch, pos, n_heads * d_head]``); ``neurons``: the
    MLP's hidden activation ``[batch, pos, d_mlp]``; ``mlp``/``attn``: the MLP's and the
    attention's outputs; ``roots``: model classes whose tail is known (the head module's
    attribute, ``None`` for a bare base model).
    """

    base_classes: ClassVar[tuple[str, ...]] = ()
    base_attr: ClassVar[str] = ""
    block_list: ClassVar[str] = ""
    final_norm: ClassVar[str | None] = None
    heads_site: ClassVar[str] = ""
    neurons_site: ClassVar[str] = ""
    mlp_site: ClassVar[str] = ""
    attn_site: ClassVar[str] = ""
    roots: ClassVar[dict[str, str | None]] = {}

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        prefix = self.find_prefix(model)
        assert prefix is not None
        self.prefix = prefix
        self.base: nn.Module = model.get_submodule(prefix) if prefix else model
        self.config: Any = getattr(self.base, "config", None) or model.config
        head = f"^{re.escape(self._path(self.block_list))}\\.(\\d+)(?:\\.|$|@)"
        self._layer_re = re.compile(head)

    # -- detection ---------------------------------------------------------------------
    @classmethod
    def is_base(cls, module: nn.Module) -> bool:
        return bool(_class_names(module) & set(cls.base_classes))

    @classmethod
    def find_prefix(cls, model: nn.Module) -> str | None:
        if cls.is_base(model):
            return ""
        inner = getattr(model, cls.base_attr, None) if cls.base_attr else None
        if isinstance(inner, nn.Module) and cls.is_base(inner):
            return cls.base_attr
        return None

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        return cls.find_prefix(model) is not None

    # -- config --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks()[1])

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def d_head(self) -> int:
        explicit = getattr(self.config, "head_dim", None)
        return int(explicit or self.config.hidden_size // self.n_heads)

    @property
    def d_mlp(self) -> int:
        return int(self.config.intermediate_size)

    # -- structure ---------------------------------------------------------------------
    def _path(self, rel: str) -> str:
        return f"{self.prefix}.{rel}" if self.prefix else rel

    def site_of(self, template: str, layer: int) -> str:
        """The full site key of ``template`` (relative to the base model) at ``layer``."""
        return self._path(template.format(L=layer))

    def blocks(self) -> tuple[str, nn.ModuleList]:
        path = self._path(self.block_list)
        return path, self.model.get_submodule(path)  # type: ignore[return-value]

    def layer_of(self, site: Site) -> int | None:
        m = self._layer_re.match(site.key)
        return int(m.group(1)) if m else None

    def unit_info(self, site: Site) -> UnitInfo:
        layer = self.layer_of(site)
        if layer is None:
            return UnitInfo(None, "other", None)
        kinds = (
            (self.heads_site, "head"),
            (self.neurons_site, "neuron"),
            (self.attn_site, "attn_out"),
            (self.mlp_site, "mlp_out"),
            (f"{self.block_list}.{{L}}@input", "resid"),
        )
        for template, kind in kinds:
            if site.key == self.site_of(template, layer):
                heads = None
                if kind == "head":
                    heads = HeadLayout(self.n_heads, self.d_head, flat=True)
                return UnitInfo(layer, kind, heads)  # type: ignore[arg-type]
        return UnitInfo(layer, "other", None)

    def check_site(self, site: Site) -> Site:
        if site.heads is None:
            return site
        layer = self.layer_of(site)
        hint = None if layer is None else f"{self.site_of(self.heads_site, layer)}[heads=h]"
        return check_heads(site, self.unit_info(site).heads, hint=hint)

    def units(
        self,
        granularity: Granularity = "components",
        *,
        layers: list[int] | None = None,
        n_positions: int | None = None,
    ) -> list[str]:
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; use one of {GRANULARITIES}")
        n_layers = self.n_layers
        chosen = list(range(n_layers)) if layers is None else list(layers)
        for layer in chosen:
            if not 0 <= layer < n_layers:
                raise IndexError(f"layer {layer} out of range for a model with {n_layers} layers")
        if granularity == "positions" and n_positions is None:
            raise ValueError("positions granularity needs n_positions")
        out: list[str] = []
        for layer in chosen:
            if granularity in ("heads", "components"):
                key = self.site_of(self.heads_site, layer)
                out += [f"{key}[heads={h}]" for h in range(self.n_heads)]
            if granularity in ("mlps", "components"):
                out.append(self.site_of(self.mlp_site, layer))
            if granularity == "neurons":
                key = self.site_of(self.neurons_site, layer)
                out += [f"{key}[neurons={i}]" for i in range(self.d_mlp)]
            if granularity == "layers":
                out += [self.site_of(self.attn_site, layer), self.site_of(self.mlp_site, layer)]
            if granularity == "positions":
                block = self.site_of(self.block_list + ".{L}", layer)
                out += [f"{block}@input[pos={p}]" for p in range(n_positions or 0)]
        return out

    def neuron_weight(self, layer: int) -> Tensor | None:
        """``[d_mlp, d_model]``: what each neuron of ``layer`` writes into the stream
        after the block (``None``: not written linearly there)."""
        return None

    def head_weight(self, layer: int) -> Tensor | None:
        """``[n_heads * d_head, d_model]``: the attention output projection of ``layer``
        as ``y = x @ W`` (``None``: the heads are not written linearly)."""
        return None

    # Where each kind of unit's delta enters (see LinearWrite); subclasses override.
    neuron_enters: ClassVar[str] = "post"

    def head_enters(self) -> str | None:
        """``"mid"`` (the stream between attention and MLP), ``"post"`` (parallel
        attention and MLP: the block output) or ``"norm"`` (post-LN)."""
        return "mid"

    def linear_write(self, site: Site) -> LinearWrite | None:
        info = self.unit_info(site)
        if info.layer is None:
            return None
        if info.kind == "neuron":
            weight = self.neuron_weight(info.layer)
            enters = self.neuron_enters
        elif info.kind == "head":
            weight, enters = self.head_weight(info.layer), self.head_enters()
            if weight is not None:  # [n_heads, d_head, d_model], as LinearWrite says
                weight = weight.reshape(self.n_heads, self.d_head, weight.shape[-1])
        else:
            return None
        if weight is None or enters is None:
            return None
        return LinearWrite(weight, info.layer, enters)  # type: ignore[arg-type]

    def _module(self, template: str, layer: int) -> nn.Module:
        return self.model.get_submodule(self.site_of(template, layer))

    # -- resuming ------------------------------------------------------------------------
    def _root_head(self) -> tuple[bool, str | None]:
        if self.prefix == "":
            return True, None
        for name, head in self.roots.items():
            if type(self.model).__name__ == name:  # a subclass may compute its own logits
                return True, head
        return False, None

    def can_resume(self) -> bool:
        # The tail and the linear writes mirror the stock classes' forwards: any class of
        # the user's own (a subclass scaling the logits, a swapped-in block or attention)
        # takes the full hooked forward instead. (TransformerLens modules: a bridge's
        # components inside the HF model it wraps, checked by the bridge's own tests.)
        known, _ = self._root_head()
        base_ok = type(self.base).__name__ in self.base_classes
        return (
            known
            and base_ok
            and not self.model.training
            and stock_modules(self.model, ("transformers", "torch", "transformer_lens"))
        )

    def resume_call(
        self, args: tuple, kwargs: dict[str, Any], *, block: int | None = None
    ) -> tuple[tuple, dict] | None:
        # The clean run filled a key/value cache; a repeat would append to it. A cache
        # that starts empty only returns the keys and values it is given, so running
        # without one is the same computation (transformers does the same under
        # gradient checkpointing). A cache that held earlier tokens cannot be dropped.
        # Lengths count the first layer's entries when the block is called: 0 at block 0
        # (nothing cached yet), this forward's tokens at every later block. Anything else
        # means earlier tokens (a cache holding exactly as many earlier tokens as this
        # input would pass a check that ignored the block index). Unknown block: only a
        # cache that is empty or holds just this forward's tokens.
        hidden = args[0] if args else None  # the stream must come positionally
        if not isinstance(hidden, Tensor):
            return None
        allowed = (
            (0, hidden.shape[1]) if block is None else ((0,) if block == 0 else (hidden.shape[1],))
        )

        def drop(value: Any) -> Any:
            if not _is_cache(value):
                return value
            if value.get_seq_length() not in allowed:  # type: ignore[union-attr]
                raise _UnsafeError
            return None

        try:
            new_args = tuple(drop(a) for a in args)
            new_kwargs = {k: drop(v) for k, v in kwargs.items()}
        except _UnsafeError:
            return None
        if "use_cache" in new_kwargs:
            new_kwargs["use_cache"] = False
        return new_args, new_kwargs

    def tail(self, hidden: Tensor) -> Tensor:
        known, head = self._root_head()
        if not known:
            raise NotImplementedError(f"the tail of {type(self.model).__name__} is not known")
        if self.final_norm is not None:
            hidden = self.model.get_submodule(self._path(self.final_norm))(hidden)
        if head is not None:
            hidden = getattr(self.model, head)(hidden)
        return hidden


class _UnsafeError(Exception):
    pass


def _is_cache(value: Any) -> bool:
    if value is None or isinstance(value, (Tensor, int, float, bool, str, tuple)):
        return False
    return any(n.endswith("Cache") for n in _class_names(value)) and hasattr(
        value, "get_seq_length"
    )
