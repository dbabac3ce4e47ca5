"""Input validation shared by the seed API: nested lists, indices, means.

Every error names what was wrong and where (the row, the index, the shape), because a
silent wrong answer in an ablation looks exactly like a scientific result.
"""

from __future__ import annotations

import decimal
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "check_numeric_rows",
    "check_real",
    "is_torch_tensor",
    "list_shape",
    "means_to_list",
    "normalize_indices",
]


def is_torch_tensor(x: object) -> bool:
    """True for a ``torch.Tensor`` without importing torch when nobody else has."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def list_shape(x: Sequence[Any], what: str) -> tuple[int, ...]:
    """Shape of a rectangular nested list; ``ValueError`` naming the first ragged row.

    The depth is read off the first elements; every sub-list must then have the same
    length as its siblings. ``[]`` has shape ``(0,)``.
    """
    shape: list[int] = []
    probe: Any = x
    while isinstance(probe, (list, tuple)):
        shape.append(len(probe))
        if len(probe) == 0:
            break
        probe = probe[0]
    _check_rectangular(x, tuple(shape), (), what)
    return tuple(shape)


def _check_rectangular(
    x: Sequence[Any], shape: tuple[int, ...], where: tuple[int, ...], what: str
) -> None:
    if len(x) != shape[0]:
        raise ValueError(
            f"{what} is ragged: row {list(where)} has length {len(x)}, expected {shape[0]} "
            f"(the length of the first row at that depth)"
        )
    if len(shape) == 1:
        return
    for i, sub in enumerate(x):
        if not isinstance(sub, (list, tuple)):
            raise ValueError(
                f"{what} is ragged: element {list(where) + [i]} is {type(sub).__name__}, "
                f"expected a list of length {shape[1]}"
            )
        _check_rectangular(sub, shape[1:], where + (i,), what)


def check_numeric_rows(x: Sequence[Any], depth: int, what: str) -> None:
    """``TypeError`` naming the first non-numeric entry of a rectangular nested list.

    The check reads only each entry's *type* (``set(map(type, row))`` runs at C speed) and
    never converts a value: an entry that is not ablated must pass through untouched, as
    in the reference, even when no float could hold it (``10**400``).
    """
    if depth == 1:
        _check_numeric_row(x, (), what)
        return
    stack: list[tuple[Sequence[Any], int, tuple[int, ...]]] = [(x, depth, ())]
    while stack:
        node, d, where = stack.pop()
        if d == 1:
            _check_numeric_row(node, where, what)
        else:
            stack.extend((sub, d - 1, where + (i,)) for i, sub in enumerate(node))


def _check_numeric_row(row: Sequence[Any], where: tuple[int, ...], what: str) -> None:
    if all(_is_real_type(t) for t in set(map(type, row))):
        return
    for j, v in enumerate(row):
        if isinstance(v, (list, tuple)):
            raise ValueError(
                f"{what} is ragged: element {list(where) + [j]} is a list, expected a number"
            )
        if not _is_real_type(type(v)):
            raise TypeError(
                f"{what} must hold real numbers (int, float, Fraction, numpy scalars): element "
                f"{list(where) + [j]} is {v!r} ({type(v).__name__}){_hint(v)}"
            )


def _hint(v: object) -> str:
    if isinstance(v, decimal.Decimal):
        return "; Decimal is not supported (mixed with floats its arithmetic fails): use float()"
    return ""


def _is_real_type(t: type) -> bool:
    # numbers.Real covers int, float, bool, Fraction and numpy's scalars; np.bool_ is not
    # registered but is a plain truth value, as Python's bool is.
    return t is not decimal.Decimal and (issubclass(t, numbers.Real) or t is np.bool_)


def check_real(v: object, what: str) -> None:
    """``TypeError`` naming ``what`` unless ``v`` is a real number that ``round`` accepts.

    Decimal is refused, and so is ``np.bool_`` (it has no ``__round__``: the reference
    fails on it too).
    """
    if type(v) is np.bool_ or not _is_real_type(type(v)):
        raise TypeError(
            f"{what} = {v!r} is not a real number ({type(v).__name__}){_hint(v)}; "
            "accepted: int, float, Fraction, numpy scalars"
        )


def normalize_indices(neurons_to_ablate: Any, n: int) -> list[int]:
    """Sorted unique neuron indices, each checked to lie in ``[0, n)``.

    Accepts any iterable of integers (list, tuple, range, integer numpy array or
    tensor). Duplicates are allowed and collapse. Negative indices are rejected rather
    than wrapped: ``-1`` meaning "the last neuron" is a Python habit that silently
    ablates the wrong unit when an index was computed wrongly.
    """
    if isinstance(neurons_to_ablate, (str, bytes)) or not hasattr(neurons_to_ablate, "__iter__"):
        raise TypeError(
            "neurons_to_ablate must be an iterable of integer indices, got "
            f"{type(neurons_to_ablate).__name__}"
        )
    if is_torch_tensor(neurons_to_ablate) or isinstance(neurons_to_ablate, np.ndarray):
        raw = neurons_to_ablate.reshape(-1).tolist()
    else:
        raw = list(neurons_to_ablate)
    out = set()
    for pos, i in enumerate(raw):
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            try:
                if isinstance(i, bool):
                    raise TypeError
                i = operator.index(i)
            except TypeError:
                raise TypeError(
                    f"neurons_to_ablate[{pos}] = {i!r} is not an integer index ({type(i).__name__})"
                ) from None
        i = int(i)
        if not 0 <= i < n:
            raise IndexError(
                f"neurons_to_ablate[{pos}] = {i} is out of range for {n} neurons "
                f"(valid indices are 0..{n - 1}; negative indices are not allowed)"
            )
        out.add(i)
    return sorted(out)


def means_to_list(mean_activations: Any, n: int) -> list[Any]:
    """The means as a flat Python list of length ``n`` (values keep their Python type)."""
    if is_torch_tensor(mean_activations) or isinstance(mean_activations, np.ndarray):
        if mean_activations.ndim != 1:
            raise ValueError(
                f"mean_activations must be 1-D with {n} entries, got shape "
                f"{tuple(mean_activations.shape)}"
            )
        if isinstance(mean_activations, np.ndarray) and not (
            np.issubdtype(mean_activations.dtype, np.number) or mean_activations.dtype == np.bool_
        ):
            raise TypeError(f"mean_activations must be numeric, got dtype {mean_activations.dtype}")
        values = mean_activations.tolist()
    elif isinstance(mean_activations, (list, tuple)):
        values = list(mean_activations)
    else:
        raise TypeError(
            "mean_activations must be a list, numpy array or torch tensor, got "
            f"{type(mean_activations).__name__}"
        )
    if len(values) != n:
        raise ValueError(
            f"mean_activations has {len(values)} entries but the activations have {n} "
            "neurons (last dimension); they must match"
        )
    return values
