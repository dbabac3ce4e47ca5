"""A Hugging Face block computed only at the positions a metric reads.

When a metric reads some positions only (the last token, a ``metric_mask``, a masked
LM's mask tokens), the last block's output is needed there only: its queries, the
attention output projection, the MLP half and the tail run at those positions, while
keys and values still come from every position. The families' ``block_at`` methods
(``hf_gpt2``, ``hf_llama``, ``hf_neox``, ``hf_bert``) call the block's own submodules
for that; this module holds what they share: reading a recorded block call, the
attention mask cut to the chosen queries, and the attention itself through the very
function the model's attention module calls (``eager`` or ``sdpa``; others are not
taken).

The result equals the block's own output at those positions up to float rounding (other
matmul shapes), so only continuous metrics take it (see
:func:`meanablate.discovery.layerskip.run_from`).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["attend_at", "bound_call", "query_mask"]

_IMPLS = ("eager", "sdpa")


def bound_call(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """A block's recorded call as ``{parameter: value}`` (defaults filled in), or ``None``
    when it does not bind to the block's ``forward`` signature."""
    try:
        sig = inspect.signature(type(block).forward)
        bound = sig.bind(block, *args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    out = dict(bound.arguments)
    for name, p in sig.parameters.items():  # **kwargs: flatten into the dict
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(out.pop(name, {}) or {})
    return out


def query_mask(
    mask: Any, positions: Tensor, n: int, *, causal: bool, eager: bool, dtype: torch.dtype
) -> Tensor | None:
    """The attention mask of the queries at ``positions`` (keys: all ``n`` positions).

    ``mask``: the block's recorded 4-D mask ``[batch|1, 1|heads, n|1, n]`` (bool for
    ``sdpa``, additive float for ``eager``) or ``None`` (``sdpa`` without padding: causal
    by the kernel's flag, which aligns a shorter query block top-left, so a causal mask
    is written out here). Raises ``ValueError`` on a mask of another form.
    """
    if mask is None:
        if not causal:
            return None
        keys = torch.arange(n, device=positions.device)
        allowed = (keys[None, :] <= positions[:, None])[None, None]
        if not eager:
            return allowed
        zero = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
        return zero.masked_fill(~allowed, torch.finfo(dtype).min)
    if not isinstance(mask, Tensor) or mask.ndim != 4 or mask.shape[-1] != n:
        raise ValueError(f"an attention mask of shape {getattr(mask, 'shape', None)}")
    if mask.shape[-2] == 1:
        return mask
    if mask.shape[-2] != n:
        raise ValueError(f"an attention mask of shape {tuple(mask.shape)}")
    return mask[:, :, positions]


def attend_at(
    attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Any, positions: Tensor
) -> Tensor | None:
    """The attention output ``[batch, len(positions), heads * d_head]`` of queries ``q``
    ``[batch, heads, len(positions), d_head]`` (already at ``positions``, rotated where
    the model rotates) over keys and values ``[batch, kv_heads, n, d_head]``.

    Runs the function ``attn``'s own forward runs (its module's ``eager_attention_forward``
    or the registered ``sdpa`` one) with ``attn.scaling``; ``None`` for any other
    attention implementation or an unknown mask form (the caller runs the whole block).
    """
    config = getattr(attn, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    module = sys.modules.get(type(attn).__module__)
    functions = getattr(module, "ALL_ATTENTION_FUNCTIONS", None)
    eager_fn = getattr(module, "eager_attention_forward", None)
    scaling = getattr(attn, "scaling", None)
    if impl not in _IMPLS or functions is None or eager_fn is None or scaling is None:
        return None
    try:
        qmask = query_mask(
            mask,
            positions,
            k.shape[-2],
            causal=bool(getattr(attn, "is_causal", False)),
            eager=impl == "eager",
            dtype=q.dtype,
        )
    except ValueError:
        return None
    fn = functions.get_interface(impl, eager_fn)
    out, _ = fn(attn, q, k, v, qmask, dropout=0.0, scaling=scaling)
    return out.reshape(q.shape[0], q.shape[2], -1)


def heads_view(x: Tensor, d_head: int) -> Tensor:
    """``[batch, pos, heads * d_head]`` -> ``[batch, heads, pos, d_head]``."""
    return x.view(*x.shape[:2], -1, d_head).transpose(1, 2)
