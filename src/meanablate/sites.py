"""Naming what to ablate: a module path plus a selector (neurons, heads, positions).

A :class:`Site` is a place whose activation can be read and replaced: the output (or the
input) of any submodule, named by its path in ``model.named_modules()``. Its selector
narrows it to units:

- ``neurons``: indices along the last dimension;
- ``heads``: indices along the head dimension (``-2`` of ``[batch, pos, head, d_head]``;
  with ``n_heads`` set, a flat ``[..., n_heads * d_head]`` activation such as the input
  of HF GPT-2's ``attn.c_proj`` is viewed as ``[..., n_heads, d_head]``);
- ``positions``: indices along the token dimension (dim 1 of ``[batch, pos, ...]``).

Sites have a compact string form used in cards, configs and results::

    blocks.1.attn.hook_z[heads=0,2]
    blocks.0.mlp.hook_post[neurons=5]
    transformer.h.1.attn.c_proj@input[heads=3;n_heads=12]
    blocks.0.hook_resid_pre[pos=4]
    blocks.1.hook_mlp_out                    (the whole activation)
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from torch import nn

__all__ = ["Site", "as_sites", "parse_site", "resolve_module"]

_SITE_RE = re.compile(r"^(?P<module>[^\[\]@]+)(?P<io>@input|@output)?(?:\[(?P<sel>[^\]]*)\])?$")
_KEYS = {
    "neurons": "neurons",
    "heads": "heads",
    "pos": "positions",
    "positions": "positions",
    "n_heads": "n_heads",
}


@dataclass(frozen=True)
class Site:
    """A module path and the units of its activation to ablate (``None``: all of them).

    >>> str(Site("blocks.1.attn.hook_z", heads=(0, 2)))
    'blocks.1.attn.hook_z[heads=0,2]'
    >>> parse_site("blocks.0.mlp.hook_post[neurons=5;pos=3]").positions
    (3,)
    """

    module: str
    neurons: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    n_heads: int | None = None
    io: Literal["output", "input"] = "output"

    def __post_init__(self) -> None:
        if not isinstance(self.module, str) or not self.module:
            raise ValueError(f"a site needs a module path, got {self.module!r}")
        for field in ("neurons", "heads", "positions"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, int):
                value = (value,)
            try:
                value = tuple(sorted({_as_index(i, field) for i in value}))
            except TypeError as exc:
                raise TypeError(f"site {self.module}: {exc}") from None
            except IndexError as exc:
                raise IndexError(f"site {self.module}: {exc}") from None
            if not value:
                raise ValueError(f"site {self.module}: {field} is empty; use None for all units")
            object.__setattr__(self, field, value)
        if self.io not in ("output", "input"):
            raise ValueError(f"site {self.module}: io must be 'output' or 'input', got {self.io!r}")
        if self.n_heads is not None and (self.heads is None or self.n_heads < 1):
            raise ValueError(f"site {self.module}: n_heads needs heads and must be >= 1")
        if self.heads is not None and self.neurons is not None:
            raise ValueError(f"site {self.module}: choose heads or neurons, not both")

    @property
    def key(self) -> str:
        """The activation this site reads: module path and side (means are stored per key)."""
        return self.module if self.io == "output" else f"{self.module}@input"

    def with_units(self, **units: object) -> Site:
        """A copy with other selectors, e.g. ``site.with_units(neurons=(3,))``."""
        return replace(self, **units)  # type: ignore[arg-type]

    def __str__(self) -> str:
        parts = []
        for name, value in (
            ("heads", self.heads),
            ("neurons", self.neurons),
            ("pos", self.positions),
        ):
            if value is not None:
                parts.append(f"{name}={','.join(map(str, value))}")
        if self.n_heads is not None:
            parts.append(f"n_heads={self.n_heads}")
        io = "@input" if self.io == "input" else ""
        return f"{self.module}{io}" + (f"[{';'.join(parts)}]" if parts else "")


def _as_index(i: object, field: str) -> int:
    if isinstance(i, bool) or not hasattr(i, "__index__"):
        raise TypeError(f"{field} must be integer indices, got {i!r}")
    value = int(i)  # type: ignore[call-overload]
    if value < 0:
        raise IndexError(f"{field} index {value} is negative; indices start at 0")
    return value


def parse_site(text: str) -> Site:
    """Parse the string form (see the module docstring) into a :class:`Site`.

    >>> import meanablate as ma
    >>> site = ma.parse_site("blocks.0.attn.hook_z[heads=1,3]")
    >>> site.key, site.heads
    ('blocks.0.attn.hook_z', (1, 3))
    """
    if isinstance(text, Site):
        return text
    if not isinstance(text, str):
        raise TypeError(f"a site is a Site or a string, got {type(text).__name__}")
    match = _SITE_RE.match(text.strip())
    if not match:
        raise ValueError(
            f"cannot parse site {text!r}; expected e.g. 'blocks.0.attn.hook_z[heads=1]'"
        )
    kwargs: dict[str, object] = {}
    sel = match.group("sel")
    if sel:
        for part in sel.split(";"):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in _KEYS:
                raise ValueError(
                    f"site {text!r}: unknown selector {part!r}; "
                    "use heads=, neurons=, pos=, n_heads="
                )
            try:
                numbers = [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"site {text!r}: {name} must be integers, got {value!r}") from None
            if _KEYS[name] in kwargs:
                raise ValueError(f"site {text!r}: {name} is given twice")
            if name == "n_heads" and len(numbers) != 1:
                raise ValueError(f"site {text!r}: n_heads must be one integer, got {value!r}")
            kwargs[_KEYS[name]] = numbers[0] if name == "n_heads" else tuple(numbers)
    io = "input" if match.group("io") == "@input" else "output"
    return Site(match.group("module"), io=io, **kwargs)  # type: ignore[arg-type]


def as_sites(sites: Site | str | Iterable[Site | str]) -> list[Site]:
    """Normalize one site or many (objects or strings) into a list of :class:`Site`."""
    if isinstance(sites, (Site, str)):
        return [parse_site(sites)]
    return [parse_site(s) for s in sites]


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``; an unknown path lists the closest existing names."""
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    if path:
        # named_modules() lists a module shared by two parents under one path only
        # (TransformerLens bridges alias hook points this way); the other path is valid.
        try:
            return model.get_submodule(path)
        except AttributeError:
            pass
    close = difflib.get_close_matches(path, list(modules), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    from meanablate._tl_names import tl_equivalent

    same = tl_equivalent(model, path)
    if same is not None:
        hint = (
            f"; {path!r} is a TransformerLens hook name: on this {type(model).__name__} the "
            f"same activation is {same}"
        )
    raise ValueError(f"{type(model).__name__} has no module named {path!r}{hint}")


def check_units_in_range(site: Site, shape: Sequence[int]) -> None:
    """``IndexError`` if a selected unit lies outside the activation's ``shape``."""
    if site.neurons is not None and max(site.neurons) >= shape[-1]:
        raise IndexError(
            f"site {site}: neuron {max(site.neurons)} out of range for "
            f"activation shape {tuple(shape)} (last dim {shape[-1]})"
        )
    if site.heads is not None:
        n_heads = (
            site.n_heads if site.n_heads is not None else (shape[-2] if len(shape) >= 2 else 0)
        )
        if site.n_heads is not None and shape[-1] % site.n_heads:
            raise ValueError(
                f"site {site}: last dim {shape[-1]} is not divisible by n_heads={site.n_heads}"
            )
        if site.n_heads is None and len(shape) < 4:
            # [batch, pos, d] has no head dim: dim -2 would be the position axis.
            raise ValueError(
                f"site {site}: activation shape {tuple(shape)} has no head dim "
                "(heads= without n_heads needs [batch, pos, head, d_head]); "
                "pass n_heads to view a flat [..., n_heads*d_head] activation"
            )
        if max(site.heads) >= n_heads:
            raise IndexError(
                f"site {site}: head {max(site.heads)} out of range for "
                f"{n_heads} heads (activation shape {tuple(shape)})"
            )
    if site.positions is not None:
        if (len(shape) < 3 and site.heads is None) or len(shape) < 2:
            raise ValueError(f"site {site}: activation shape {tuple(shape)} has no position dim")
        if max(site.positions) >= shape[1]:
            raise IndexError(
                f"site {site}: position {max(site.positions)} out of range for "
                f"sequence length {shape[1]} (activation shape {tuple(shape)})"
            )
