"""The seed API (``mean_ablation``, ``compute_ablation_effect``) and the tensor kernel.

There is one implementation of "replace these units with their means":
:func:`replace_where` (``where(mask, fill, x)``, exact, one read and one write of ``x``).
The list path runs it on a numpy *object* array, so Python values keep their types (ints
stay ints) and the result equals the reference value for value; the numpy and torch
paths run it on the data itself; the model-level hooks (:mod:`meanablate.intervene`) run
it on activations with broadcast masks (heads, positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from meanablate._checks import (
    check_numeric_rows,
    check_real,
    is_torch_tensor,
    list_shape,
    means_to_list,
    normalize_indices,
)
from meanablate._fills import fill_value
from meanablate.errors import NumericOverflowError

__all__ = ["ablation_plan", "compute_ablation_effect", "mean_ablation", "replace_where"]

ArrayT = TypeVar("ArrayT")

# Row blocks of this many elements are written while still in cache: copying a block
# and patching its ablated columns in one visit keeps the whole operation at one read
# and one write of memory (a full copy followed by a column scatter would be two).
_BLOCK_ELEMENTS = 1 << 16


def replace_where(x: ArrayT, mask: Any, fill: Any) -> ArrayT:
    """``where(mask, fill, x)`` for numpy arrays (any dtype, object included) and tensors.

    Shapes: ``x`` is ``[..., n]``; ``mask`` (bool) and ``fill`` broadcast against it
    (``[n]`` for neurons, ``[pos, n]`` for per-position means, ``[heads, 1]`` for heads).
    Returns a new array/tensor of ``x``'s shape, dtype and device; ``x`` is not modified.
    Unmasked entries are ``x``'s own values bit for bit; masked entries are ``fill``.

    >>> import numpy as np
    >>> replace_where(np.array([[1.0, 2.0, 3.0]]), np.array([False, True, False]), 9.0)
    array([[1., 9., 3.]])
    """
    if is_torch_tensor(x):
        import torch

        fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
        mask_t = torch.as_tensor(mask, dtype=torch.bool, device=x.device)
        if _numpy_can_serve(x, mask_t, fill_t):
            # On CPU the numpy block kernel beats torch.where (and even clone(), whose
            # fresh allocation page-faults); it shares memory with the tensors, no copies.
            out = _replace_columns_blocked(x.numpy(), mask_t.numpy(), fill_t.numpy())
            return torch.from_numpy(out)  # type: ignore[return-value]
        return torch.where(mask_t, fill_t, x)  # type: ignore[return-value]
    if not isinstance(x, np.ndarray):
        raise TypeError(f"replace_where expects a numpy array or torch tensor, got {type(x)}")
    fill_a = np.asarray(fill, dtype=x.dtype)
    mask_a = np.asarray(mask, dtype=bool)
    if x.ndim >= 2 and mask_a.ndim <= 1 and fill_a.ndim <= 1 and x.flags.c_contiguous:
        return _replace_columns_blocked(x, mask_a, fill_a)
    return np.where(mask_a, fill_a, x)


def _replace_columns_blocked(x: np.ndarray, mask: np.ndarray, fill: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    cols = np.flatnonzero(np.broadcast_to(mask, (n,)))
    vals = np.broadcast_to(fill, (n,))[cols]
    src = x.reshape(-1)
    out = np.empty_like(src)
    rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    step = rows * n
    # Flat positions of the ablated entries within one block: a 1-D fancy assignment is
    # numpy's fastest scatter, several times faster than ``block[:, cols] = vals``.
    flat_idx = (np.arange(rows)[:, None] * n + cols[None, :]).reshape(-1)
    flat_val = np.tile(vals, rows)
    for start in range(0, src.size, step):
        block = out[start : start + step]
        block[...] = src[start : start + step]
        k = (block.size // n) * cols.size
        block[flat_idx[:k]] = flat_val[:k]
    return out.reshape(x.shape)


def _numpy_can_serve(x: Any, mask: Any, fill: Any) -> bool:
    import torch

    return (
        x.device.type == "cpu"
        and not x.requires_grad
        and x.dtype in (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32)
        and x.ndim >= 2
        and x.is_contiguous()
        and mask.ndim <= 1
        and fill.ndim <= 1
    )


def ablation_plan(
    mean_activations: Any, neurons_to_ablate: Any, n: int, decimals: int | None
) -> tuple[list[int], list[Any]]:
    """The semantics of the seed in one place: which neurons, and what they become.

    Returns ``(indices, values)``: the sorted unique indices to ablate, each checked to
    lie in ``[0, n)``, and the replacement for each — the neuron's mean rounded with
    Python's ``round(mean, decimals)`` as the reference does (``decimals=None``: no
    rounding). Python's ``round`` is correctly rounded in decimal, unlike
    ``np.round``, which is why the values are computed here and not in the kernel.
    """
    if decimals is not None and (isinstance(decimals, bool) or not isinstance(decimals, int)):
        raise TypeError(f"decimals must be an int or None, got {decimals!r}")
    indices = normalize_indices(neurons_to_ablate, n)
    means = means_to_list(mean_activations, n)
    values = []
    for i in indices:
        m = means[i]
        check_real(m, f"mean_activations[{i}]")
        values.append(m if decimals is None else round(m, decimals))
    return indices, values


def mean_ablation(
    activations: Any,
    mean_activations: Any,
    neurons_to_ablate: Any,
    *,
    decimals: int | None = 6,
) -> Any:
    """Replace the chosen neurons' activations with their (rounded) dataset means.

    Shapes: ``activations`` is ``[..., n]`` (the seed's ``[batch, n]``, or
    ``[batch, pos, n]``, ...) as nested lists, a numpy array or a torch tensor;
    ``mean_activations`` is ``[n]`` (list, array or tensor); ``neurons_to_ablate`` is
    any iterable of indices in ``[0, n)`` (duplicates allowed).

    Returns the same kind of object with the same shape (and dtype and device):
    ablated entries hold ``round(mean, decimals)``, all others are passed through
    untouched. On lists the result equals the seed reference value for value and type
    for type (entries that are not ablated are never converted, so ``10**400`` passes
    through). The input is never modified.

    Numbers: ``int``, ``float``, ``bool``, ``Fraction`` and numpy scalars; ``Decimal`` is
    refused (``TypeError``). Integer (and bool) arrays take only means they hold exactly
    — a whole number in the dtype's range — and float arrays only means whose magnitude
    they can hold; otherwise an :class:`~meanablate.errors.UnrepresentableValueError`
    (a ``ValueError`` and a ``TypeError``) names the mean and the dtype. numpy array
    subclasses (``np.matrix``, masked arrays) are refused with a ``TypeError``.

    >>> mean_ablation([[1.0, 2.0], [3.0, 4.0]], [2.0, 3.0000004], [1])
    [[1.0, 3.0], [3.0, 3.0]]
    """
    if isinstance(activations, (list, tuple)):
        return _mean_ablation_list(activations, mean_activations, neurons_to_ablate, decimals)
    if isinstance(activations, np.ndarray) or is_torch_tensor(activations):
        return _mean_ablation_array(activations, mean_activations, neurons_to_ablate, decimals)
    raise TypeError(
        "activations must be a nested list, a numpy array or a torch tensor, got "
        f"{type(activations).__name__}"
    )


def _mean_ablation_list(
    activations: Sequence[Any], mean_activations: Any, neurons: Any, decimals: int | None
) -> list[Any]:
    shape = list_shape(activations, "activations")
    if shape == (0,):
        # Nothing to ablate, but the arguments must still make sense on their own.
        normalize_indices(neurons, 1 << 62)
        return []
    if 0 in shape:
        raise ValueError(f"activations has shape {shape}: every dimension must be non-empty")
    check_numeric_rows(activations, len(shape), "activations")
    n = shape[-1]
    indices, values = ablation_plan(mean_activations, neurons, n, decimals)
    obj = np.empty(shape, dtype=object)
    obj[...] = activations
    mask = np.zeros(n, dtype=bool)
    mask[indices] = True
    fill = np.empty(n, dtype=object)
    fill[indices] = values
    return replace_where(obj, mask, fill).tolist()


def _mean_ablation_array(
    activations: Any, mean_activations: Any, neurons: Any, decimals: int | None
) -> Any:
    _check_plain_array(activations, "activations")
    if activations.ndim == 0:
        raise ValueError("activations must have at least one dimension [..., n], got a scalar")
    _check_array_numeric(activations, "activations")
    n = int(activations.shape[-1])
    indices, values = ablation_plan(mean_activations, neurons, n, decimals)
    if not indices:
        return activations.copy() if isinstance(activations, np.ndarray) else activations.clone()
    exact = [fill_value(activations.dtype, i, v) for i, v in zip(indices, values)]
    if isinstance(activations, np.ndarray):
        mask = np.zeros(n, dtype=bool)
        mask[indices] = True
        fill = np.zeros(n, dtype=activations.dtype)
        fill[indices] = np.asarray(exact, dtype=activations.dtype)
    else:
        import torch

        mask = torch.zeros(n, dtype=torch.bool, device=activations.device)
        mask[indices] = True
        fill = torch.zeros(n, dtype=activations.dtype, device=activations.device)
        if _is_integer_dtype(activations):
            # Straight from Python ints: a float64 detour would round 2**53 + 1.
            vals = torch.tensor(exact, dtype=activations.dtype)
        else:
            vals = torch.tensor(exact, dtype=torch.float64).to(activations.dtype)
        fill[indices] = vals.to(activations.device)
    return replace_where(activations, mask, fill)


def _check_plain_array(x: Any, what: str) -> None:
    # ndarray subclasses change indexing (np.matrix stays 2-D under reshape(-1)) or carry
    # their own semantics (np.ma's mask): refuse them rather than guess.
    if isinstance(x, np.ndarray) and type(x) is not np.ndarray:
        raise TypeError(
            f"{what} is a {type(x).__module__}.{type(x).__name__}, a numpy array subclass "
            f"with its own indexing rules; pass a plain array (np.asarray({what}))"
        )


def _is_integer_dtype(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return bool(np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_)
    return not (x.dtype.is_floating_point or x.dtype.is_complex)


def _check_array_numeric(x: Any, what: str) -> None:
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise TypeError(f"{what} must be numeric, got numpy dtype {x.dtype}")
        if np.issubdtype(x.dtype, np.complexfloating):
            raise TypeError(f"{what} must be real, got numpy dtype {x.dtype}")
    elif x.dtype.is_complex:
        raise TypeError(f"{what} must be real, got torch dtype {x.dtype}")


def compute_ablation_effect(
    original_output: Any, ablated_output: Any, *, decimals: int | None = 6
) -> Any:
    """L2 distance between the original and the ablated outputs, rounded like the seed.

    Shapes: both ``[..., d]`` with equal shapes. 1-D lists give a Python ``float``
    equal to the reference's; nested lists give nested lists of floats ``[...]``;
    numpy arrays and tensors give the same kind of object of shape ``[...]`` (0-d for
    1-D input), in float64 (tensors on the input's device).

    Unlike the reference, outputs of different lengths are an error, not truncated.

    >>> compute_ablation_effect([0.0, 3.0], [4.0, 0.0])
    5.0
    """
    if decimals is not None and (isinstance(decimals, bool) or not isinstance(decimals, int)):
        raise TypeError(f"decimals must be an int or None, got {decimals!r}")
    if isinstance(original_output, (list, tuple)) and isinstance(ablated_output, (list, tuple)):
        return _effect_list(original_output, ablated_output, decimals)
    kinds = {type(original_output).__name__, type(ablated_output).__name__}
    a_arr = isinstance(original_output, np.ndarray), isinstance(ablated_output, np.ndarray)
    a_t = is_torch_tensor(original_output), is_torch_tensor(ablated_output)
    if all(a_arr) or all(a_t):
        return _effect_array(original_output, ablated_output, decimals)
    raise TypeError(
        "original_output and ablated_output must both be lists, both numpy arrays or both "
        f"torch tensors, got {sorted(kinds)}"
    )


def _effect_list(a: Sequence[Any], b: Sequence[Any], decimals: int | None) -> Any:
    sa, sb = list_shape(a, "original_output"), list_shape(b, "ablated_output")
    if sa != sb:
        raise ValueError(
            f"original_output has shape {sa} but ablated_output has shape {sb}; they must "
            "match (the reference silently truncates to the shorter one; we do not)"
        )
    check_numeric_rows(a, len(sa), "original_output")
    check_numeric_rows(b, len(sb), "ablated_output")
    return _effect_rows(a, b, len(sa), decimals)


def _effect_rows(a: Sequence[Any], b: Sequence[Any], depth: int, decimals: int | None) -> Any:
    if depth > 1:
        return [_effect_rows(x, y, depth - 1, decimals) for x, y in zip(a, b)]
    # Python's own sum over Python numbers, in order, then ** 0.5: the seed's arithmetic,
    # so the rounded result is the reference's on every interpreter version.
    a, b = _python_numbers(a), _python_numbers(b)
    try:
        distance = sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5
    except OverflowError:
        raise NumericOverflowError(
            "original_output and ablated_output: the squared distance of a row is too "
            "large for a float (the reference raises OverflowError too); rescale the outputs"
        ) from None
    return distance if decimals is None else round(distance, decimals)


def _python_numbers(row: Sequence[Any]) -> Sequence[Any]:
    # numpy scalars in a list are read as Python numbers: their own arithmetic would wrap
    # (uint8 0 - 1 = 255), overflow float32, or refuse to subtract (np.bool_).
    if not any(issubclass(t, np.generic) for t in set(map(type, row))):
        return row
    return [v.item() if isinstance(v, np.generic) else v for v in row]


def _effect_array(a: Any, b: Any, decimals: int | None) -> Any:
    _check_plain_array(a, "original_output")
    _check_plain_array(b, "ablated_output")
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"original_output has shape {tuple(a.shape)} but ablated_output has shape "
            f"{tuple(b.shape)}; they must match"
        )
    if a.ndim == 0:
        raise ValueError("outputs must have at least one dimension [..., d], got scalars")
    _check_array_numeric(a, "original_output")
    _check_array_numeric(b, "ablated_output")
    if isinstance(a, np.ndarray):
        diff = a.astype(np.float64) - b.astype(np.float64)
        dist = np.sqrt(np.einsum("...i,...i->...", diff, diff))
        if decimals is None:
            return dist
        flat = [round(float(v), decimals) for v in dist.reshape(-1)]
        return np.asarray(flat, dtype=np.float64).reshape(dist.shape)
    import torch

    dist = torch.linalg.vector_norm(a.to(torch.float64) - b.to(torch.float64), dim=-1)
    if decimals is None:
        return dist
    flat = [round(v, decimals) for v in dist.detach().reshape(-1).tolist()]
    return torch.tensor(flat, dtype=torch.float64, device=dist.device).reshape(dist.shape)
