"""TransformerLens 4 ``TransformerBridge``: TL hook names with the shapes a TL hook sees.

A bridge wraps a Hugging Face (or TransformerLens ``NativeModel``) module and exposes
``bridge.hook_dict``: TL names (``blocks.L.attn.hook_z``) that alias the bridge's own
hook points (``blocks.L.attn.o.hook_in``). A hook point's torch hooks see the raw tensor;
a TL hook function sees it after ``hook_point.hook_conversion`` — for ``hook_z`` the flat
``[batch, pos, n_heads * d_head]`` input of the output projection viewed as
``[batch, pos, head, d_head]``. :func:`meanablate.hooks.hooked` applies the same
conversion, so every site on a bridge reads and replaces exactly what
``bridge.run_with_hooks`` would give a TL hook function:

- ``blocks.L.attn.hook_q/k/v/z/result``: ``[batch, pos, head, d_head]`` (``k``/``v``:
  ``n_key_value_heads`` heads under grouped-query attention);
- ``blocks.L.attn.hook_pattern/hook_attn_scores``: ``[batch, head, q, k]`` (heads on dim
  1, so a site selector cannot address them: ablate ``hook_z[heads=h]`` instead);
- ``blocks.L.mlp.hook_pre/hook_post``: ``[batch, pos, d_mlp]`` (neurons);
- ``blocks.L.hook_resid_pre/mid/post``, ``hook_attn_out``, ``hook_mlp_out``:
  ``[batch, pos, d_model]``.

A sweep resumes from the unit's block (:mod:`meanablate.discovery.layerskip`): the bridge
puts its ``BlockBridge`` modules in place of the wrapped model's blocks, so the blocks are
called by the wrapped model's own forward and can be called again from their recorded
arguments. That is allowed only where the wrapped model's structure is known to be
embed, blocks, final norm, unembedding: an HF model whose family can resume (its rules
for repeating a block call and for the tail are used), or TransformerLens's own
``NativeModel`` without logit soft-capping. There is no linear (delta) fast path.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from torch import Tensor, nn

from meanablate.families import register
from meanablate.families.base import Family, Granularity, HeadLayout, UnitInfo
from meanablate.sites import Site

__all__ = ["TLBridge", "is_bridge", "own_hook_ids"]

_LAYER = re.compile(r"^blocks\.(\d+)\.")
# Head-split attention activations (TL's [batch, pos, head, d_head]) and which head
# count their head axis has; used when the hook point carries no head-splitting
# conversion (an architecture whose attention already returns split heads).
_HEAD_HOOKS = {
    "attn.hook_q": "n_heads",
    "attn.hook_z": "n_heads",
    "attn.hook_result": "n_heads",
    "attn.hook_k": "n_kv",
    "attn.hook_v": "n_kv",
}
# Heads on dim 1 ([batch, head, q, k]): the site kernel's axes (pos = 1, heads = -2,
# neurons = -1) do not fit, so only a whole-activation site is accepted.
_PATTERN_HOOKS = ("attn.hook_pattern", "attn.hook_attn_scores")
_NEURON_HOOKS = ("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear")


def own_hook_ids(model: nn.Module) -> set[int]:
    """Ids of the torch hooks a TransformerLens bridge's blocks registered themselves
    (``BlockBridge._capture_hook_handles``: the split-qkv and ``hook_mlp_in`` captures,
    on modules inside the block); empty for any other model."""
    if not is_bridge(model):
        return set()
    return {
        h.id
        for m in model.modules()
        for h in getattr(m, "_capture_hook_handles", ())
        if hasattr(h, "id")
    }


def is_bridge(model: object) -> bool:
    """Whether ``model`` is a TransformerLens 4 ``TransformerBridge`` (no import of TL)."""
    tb = sys.modules.get("transformer_lens.model_bridge.transformer_bridge")
    return tb is not None and isinstance(model, tb.TransformerBridge)


@register
class TLBridge(Family):
    """The :class:`~meanablate.families.base.Family` of a TransformerLens 4 bridge.

    >>> import torch, transformers
    >>> from meanablate.adapters.transformer_lens import bridge_from_hf_gpt2
    >>> from meanablate.families import family_of
    >>> hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    ...     vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    >>> fam = family_of(bridge_from_hf_gpt2(hf))
    >>> fam.units("heads")
    ['blocks.0.attn.hook_z[heads=0]', 'blocks.0.attn.hook_z[heads=1]']
    >>> fam.unit_info(Site("blocks.0.attn.hook_z", heads=(1,))).heads
    HeadLayout(n_heads=2, d_head=4, flat=False)
    """

    name = "tl_bridge"

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        return is_bridge(model)

    # -- structure ----------------------------------------------------------------
    @property
    def cfg(self) -> Any:
        return self.model.cfg  # type: ignore[union-attr]

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    def _n_heads(self, which: str) -> int:
        if which == "n_kv":
            n_kv = getattr(self.cfg, "n_key_value_heads", None)
            if n_kv:
                return int(n_kv)
        return int(self.cfg.n_heads)

    def blocks(self) -> tuple[str, nn.ModuleList] | None:
        blocks = getattr(self.model, "blocks", None)
        return ("blocks", blocks) if isinstance(blocks, nn.ModuleList) else None

    def hook_names(self) -> dict[str, Any]:
        """TL hook name -> hook point (``bridge.hook_dict``, aliases included)."""
        return dict(self.model.hook_dict)  # type: ignore[union-attr]

    def _hook_point(self, path: str) -> Any:
        hp = self.hook_names().get(path)
        if hp is None:
            try:
                hp = self.model.get_submodule(path)
            except AttributeError:
                return None
        tl = sys.modules.get("transformer_lens.hook_points")
        return hp if tl is not None and isinstance(hp, tl.HookPoint) else None

    def _rest(self, module: str) -> tuple[int | None, str]:
        m = _LAYER.match(module)
        if m is None:
            return None, module
        return int(m.group(1)), module[m.end() :]

    def _head_layout(self, site: Site) -> HeadLayout | None:
        layer, rest = self._rest(site.module)
        if layer is None:
            return None
        hp = self._hook_point(site.module)
        conv = getattr(hp, "hook_conversion", None) if hp is not None else None
        if getattr(conv, "splits_attention_heads", False):
            return HeadLayout(int(conv.n_heads), int(conv.d_head), flat=False)  # type: ignore[union-attr]
        which = _HEAD_HOOKS.get(rest)
        if which is None:
            return None
        return HeadLayout(self._n_heads(which), int(self.cfg.d_head), flat=False)

    def unit_info(self, site: Site) -> UnitInfo:
        layer, rest = self._rest(site.module)
        heads = self._head_layout(site)
        if heads is not None:
            kind = "head"
        elif rest in _NEURON_HOOKS:
            kind = "neuron"
        elif rest in ("hook_attn_out", "attn.hook_out"):
            kind = "attn_out"
        elif rest in ("hook_mlp_out", "mlp.hook_out"):
            kind = "mlp_out"
        elif rest.startswith("hook_resid") or rest in ("hook_in", "hook_out"):
            kind = "resid"
        else:
            kind = "other"
        return UnitInfo(layer, kind, heads)  # type: ignore[arg-type]

    def check_site(self, site: Site) -> Site:
        """``site`` if it fits what a TL hook function sees at its hook, else an error.

        ``heads=`` needs a head axis (``hook_q/k/v/z/result``), in range of the config's
        head count; ``n_heads=`` (a flat view) never applies, since the bridge's
        head activations are already split; ``hook_pattern``/``hook_attn_scores``
        (``[batch, head, q, k]``) take no selector.
        """
        _, rest = self._rest(site.module)
        where = f"site {site}"
        if site.io == "input" and self._hook_point(site.module) is not None:
            raise ValueError(
                f"{where}: a TransformerLens hook point's input is its output; "
                f"write {site.module!r} without '@input'"
            )
        if rest in _PATTERN_HOOKS and (
            site.heads is not None or site.positions is not None or site.neurons is not None
        ):
            raise ValueError(
                f"{where}: {site.module} is [batch, head, query, key] (heads on dim 1), "
                "which a selector cannot address; ablate heads at "
                f"{site.module.rsplit('.', 1)[0]}.hook_z[heads=h] or the whole pattern"
            )
        if site.heads is None:
            return site
        layout = self._head_layout(site)
        if layout is None:
            heads = [f"blocks.L.{h}" for h in sorted(_HEAD_HOOKS) if not h.endswith("result")]
            raise ValueError(
                f"{where}: {site.module} has no head axis (a TransformerLens hook "
                f"sees it without one); heads= works on {', '.join(heads)} "
                "(e.g. 'blocks.0.attn.hook_z[heads=1]')"
            )
        if site.n_heads is not None:
            raise ValueError(
                f"{where}: on a TransformerLens bridge {site.module} is already "
                "[batch, pos, head, d_head]; drop n_heads="
            )
        if max(site.heads) >= layout.n_heads:
            raise IndexError(
                f"{where}: head {max(site.heads)} out of range; {site.module} has "
                f"{layout.n_heads} heads (0..{layout.n_heads - 1})"
            )
        return site

    def units(
        self,
        granularity: Granularity = "components",
        *,
        layers: list[int] | None = None,
        n_positions: int | None = None,
    ) -> list[str]:
        """Unit sites in TL names; each kind is checked to exist in ``hook_dict``."""
        if granularity not in ("heads", "mlps", "components", "neurons", "layers", "positions"):
            raise ValueError(f"unknown granularity {granularity!r}")
        chosen = range(self.n_layers) if layers is None else list(layers)
        for layer in chosen:
            if not 0 <= layer < self.n_layers:
                raise IndexError(
                    f"layer {layer} out of range for a model with {self.n_layers} layers"
                )
        names = self.hook_names()
        d_mlp = None if getattr(self.cfg, "attn_only", False) else getattr(self.cfg, "d_mlp", None)

        def need(name: str) -> str:
            if name not in names:
                raise ValueError(
                    f"this {self.cfg.architecture or 'bridge'} has no hook {name!r}; "
                    "list its units as sites from bridge.hook_dict"
                )
            return name

        out: list[str] = []
        for layer in chosen:
            b = f"blocks.{layer}"
            if granularity in ("heads", "components"):
                z = need(f"{b}.attn.hook_z")
                out += [f"{z}[heads={h}]" for h in range(self._n_heads("n_heads"))]
            if granularity in ("mlps", "components") and d_mlp:
                out.append(need(f"{b}.hook_mlp_out"))
            if granularity == "neurons":
                if not d_mlp:
                    raise ValueError("the model has no MLPs, so no neurons")
                post = need(f"{b}.mlp.hook_post")
                out += [f"{post}[neurons={i}]" for i in range(int(d_mlp))]
            if granularity == "layers":
                out.append(need(f"{b}.hook_attn_out"))
                if d_mlp:
                    out.append(need(f"{b}.hook_mlp_out"))
            if granularity == "positions":
                if n_positions is None:
                    raise ValueError("positions granularity needs n_positions")
                pre = need(f"{b}.hook_resid_pre")
                out += [f"{pre}[pos={p}]" for p in range(n_positions)]
        return out

    # -- resuming from a block (the sweep's layer skipping) --------------------------
    def _wrapped(self) -> tuple[nn.Module | None, Family | None]:
        """The wrapped module and, for an HF model of a known family, that family."""
        try:
            inner = self.model.original_model  # type: ignore[union-attr]
        except AttributeError:  # a remote driver (vLLM, ...): no local module
            return None, None
        if not isinstance(inner, nn.Module):
            return None, None
        from meanablate.families import family_of

        family = family_of(inner)
        return inner, (family if family.name.startswith("hf_") else None)

    def can_resume(self) -> bool:
        found = self.blocks()
        if found is None or self.model.training:
            return False
        inner, family = self._wrapped()
        if family is not None:
            # Resuming runs our blocks: they must be the very modules the HF forward calls.
            theirs = family.blocks()
            same = theirs is not None and len(theirs[1]) == len(found[1])
            same = same and all(a is b for a, b in zip(theirs[1], found[1]))  # type: ignore[index]
            return same and family.can_resume()
        native = sys.modules.get("transformer_lens.model_bridge.sources.native.model")
        if native is None or not isinstance(inner, native.NativeModel):
            return False
        # NativeModel.forward: embed, blocks, ln_out, head, then a soft cap when one is
        # set (TL: a cap is active only when > 0).
        cap = getattr(inner, "output_logits_soft_cap", None)
        return cap is None or cap <= 0

    def resume_call(
        self, args: tuple, kwargs: dict[str, Any], *, block: int | None = None
    ) -> tuple[tuple, dict] | None:
        """The recorded call, repeatable: the stream positional, and a key/value cache
        dropped where it holds nothing yet (the bridge's attention components leave the
        HF cache empty; a cache holding earlier tokens makes the call unrepeatable)."""
        hidden = args[0] if args else None
        if not isinstance(hidden, Tensor):
            return None
        _, family = self._wrapped()
        if family is None:
            return args, kwargs
        new_args = tuple(_drop_empty_cache(a) for a in args)
        new_kwargs = {k: _drop_empty_cache(v) for k, v in kwargs.items()}
        # the rest (a cache the HF forward filled in step with the blocks) by the HF rule
        return family.resume_call(new_args, new_kwargs, block=block)

    def tail(self, hidden: Tensor) -> Tensor:
        """Final norm + unembedding of the last block's output: the wrapped HF family's
        tail (its modules are the bridge's components), else the bridge's ``ln_final``
        and ``unembed`` components (their hooks fire as in a full forward)."""
        _, family = self._wrapped()
        if family is not None:
            return family.tail(hidden)
        ln = getattr(self.model, "ln_final", None)
        unembed = getattr(self.model, "unembed", None)
        if unembed is None:
            raise NotImplementedError(f"this bridge has no unembed component: {self.cfg}")
        return unembed(ln(hidden) if ln is not None else hidden)


def _drop_empty_cache(value: Any) -> Any:
    """``None`` for an HF key/value cache that holds no tokens; anything else (a cache
    holding tokens included: the HF family's rule decides) unchanged."""
    names = {c.__name__ for c in type(value).__mro__}
    if not any(n.endswith("Cache") for n in names) or not hasattr(value, "get_seq_length"):
        return value
    if value.get_seq_length() == 0:
        return None
    return value
