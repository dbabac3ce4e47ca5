"""The seed API fuzzed with mixed Python numeric types, integer dtypes and extreme values.

The oracle is the reference solution as written (round the mean, pass everything else
through), plus the documented errors (docs/errors.md): ``Decimal`` is refused up front, a
fill an integer dtype cannot hold exactly is an ``UnrepresentableValueError`` (a
``ValueError`` and a ``TypeError``), an overflow in the distance a ``NumericOverflowError``
(a ``ValueError`` and an ``OverflowError``).
"""

from __future__ import annotations

import copy
import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meanablate import compute_ablation_effect, mean_ablation
from meanablate.errors import NumericOverflowError, UnrepresentableValueError


# -- the reference, verbatim --------------------------------------------------------------
def reference_mean_ablation(activations, mean_activations, neurons_to_ablate):
    batch_size = len(activations)
    num_neurons = len(activations[0])
    ablate_set = set(neurons_to_ablate)
    result = []
    for b in range(batch_size):
        row = []
        for n in range(num_neurons):
            if n in ablate_set:
                row.append(round(mean_activations[n], 6))
            else:
                row.append(activations[b][n])
        result.append(row)
    return result


def reference_effect(original_output, ablated_output):
    diff_sq = sum((a - b) ** 2 for a, b in zip(original_output, ablated_output))
    return round(diff_sq**0.5, 6)


# -- values -------------------------------------------------------------------------------
extreme_floats = st.sampled_from(
    [0.0, -0.0, 1e308, -1e308, 5e-324, 1.7976931348623157e308, math.inf, -math.inf, math.nan]
)
python_real = st.one_of(
    st.floats(width=64),  # NaN and inf included
    extreme_floats,
    st.integers(),
    st.integers(-(10**400), 10**400),
    st.booleans(),
    st.fractions(max_denominator=10**6),
)
numpy_real = st.one_of(
    st.floats(width=32).map(np.float32),
    st.floats(width=64).map(np.float64),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(0, 255).map(np.uint8),
    st.booleans().map(np.bool_),
)
real = st.one_of(python_real, numpy_real)
maybe_decimal = st.one_of(real, st.decimals(allow_nan=False, places=3))


def same(a, b) -> bool:
    """Equal value and type, NaN equal to NaN (element by element)."""
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, float | np.floating) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


@st.composite
def list_case(draw, values=real):
    n = draw(st.integers(1, 6))
    b = draw(st.integers(1, 4))
    acts = [[draw(values) for _ in range(n)] for _ in range(b)]
    means = [draw(values) for _ in range(n)]
    idx = draw(st.lists(st.integers(0, n - 1), max_size=2 * n))
    return acts, means, idx


def _refused(acts, means, idx) -> bool:
    # Decimal anywhere; an ablated np.bool_ mean, which round() rejects in the reference too.
    return any(isinstance(v, Decimal) for r in acts for v in r) or any(
        isinstance(means[i], Decimal | np.bool_) for i in set(idx)
    )


@given(list_case(maybe_decimal))
@settings(max_examples=500, deadline=None)
def test_list_path_is_the_reference_or_refuses_decimal(case):
    acts, means, idx = case
    before = copy.deepcopy(case)
    if _refused(acts, means, idx):
        with pytest.raises(TypeError, match=r"not a real number|Decimal"):
            mean_ablation(acts, means, idx)
    else:
        got = mean_ablation(acts, means, idx)
        assert same(got, reference_mean_ablation(acts, means, idx))
    assert str(case) == str(before)  # nothing mutated


def test_untouched_entries_are_never_converted():
    # No float holds 10**400: the reference passes it through, and so do we.
    assert mean_ablation([[10**400, 1.0]], [0.0, 0.5], [1]) == [[10**400, 0.5]]
    got = mean_ablation([[Fraction(1, 3), 2]], [0, Fraction(2, 3)], [1])
    assert got == [[Fraction(1, 3), Fraction(666667, 1000000)]]
    assert type(got[0][1]) is Fraction


# -- integer dtypes -----------------------------------------------------------------------
NP_INT = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]
TORCH_INT = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]
fill_value = st.one_of(
    st.integers(-(2**65), 2**65),
    st.sampled_from([2**53 + 1, 2**63 - 1, -(2**63), 255, 256, -1, 127, -129]),
    st.floats(width=64),
    st.floats(-300, 300).map(round).map(float),  # whole floats
    st.fractions(max_denominator=4),
    st.booleans(),
)


def _expected_int_fill(m, lo: int, hi: int):
    """The whole number a dtype of range [lo, hi] holds for mean ``m``, or None."""
    r = round(m, 6)
    if isinstance(r, float) and not r.is_integer():  # NaN, inf and fractions
        return None
    if isinstance(r, Fraction) and r.denominator != 1:
        return None
    k = int(r)
    return k if lo <= k <= hi else None


@given(st.sampled_from(NP_INT + [np.bool_]), fill_value, st.data())
@settings(max_examples=400, deadline=None)
def test_numpy_integer_dtypes_take_only_exact_fills(dtype, m, data):
    lo, hi = (0, 1) if dtype is np.bool_ else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    vals = data.draw(st.lists(st.integers(lo, hi), min_size=6, max_size=6))
    x = np.asarray(vals, dtype=dtype).reshape(2, 3)
    keep = x.copy()
    want = _expected_int_fill(m, lo, hi)
    if want is None:
        with pytest.raises(UnrepresentableValueError, match=r"mean_activations\[1\]") as err:
            mean_ablation(x, [0, m, 0], [1])
        assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)
        assert str(np.dtype(dtype)) in str(err.value)
    else:
        got = mean_ablation(x, [0, m, 0], [1])
        assert got.dtype == x.dtype
        assert [int(v) for v in got[:, 1]] == [want, want]
        np.testing.assert_array_equal(got[:, [0, 2]], x[:, [0, 2]])
    np.testing.assert_array_equal(x, keep)


@given(st.sampled_from(TORCH_INT + [torch.bool]), fill_value, st.data())
@settings(max_examples=400, deadline=None)
def test_torch_integer_dtypes_take_only_exact_fills(dtype, m, data):
    if dtype is torch.bool:
        lo, hi = 0, 1
    else:
        lo, hi = int(torch.iinfo(dtype).min), int(torch.iinfo(dtype).max)
    vals = data.draw(st.lists(st.integers(lo, hi), min_size=6, max_size=6))
    x = torch.tensor(vals, dtype=dtype).reshape(2, 3)
    keep = x.clone()
    want = _expected_int_fill(m, lo, hi)
    if want is None:
        with pytest.raises(UnrepresentableValueError, match=r"mean_activations\[1\]") as err:
            mean_ablation(x, [0, m, 0], [1])
        assert str(dtype) in str(err.value)
    else:
        got = mean_ablation(x, [0, m, 0], [1])
        assert got.dtype == x.dtype
        assert [int(v) for v in got[:, 1].tolist()] == [want, want]
        assert torch.equal(got[:, [0, 2]], x[:, [0, 2]])
    assert torch.equal(x, keep)


def test_issue_cases_integer_tensors():
    with pytest.raises(ValueError, match=r"300.0 .*torch.uint8.*\[0, 255\]"):
        mean_ablation(torch.zeros(2, 3, dtype=torch.uint8), [0, 300.0, 0], [1])
    out = mean_ablation(torch.zeros(2, 3, dtype=torch.int64), [0, 2**53 + 1, 0], [1])
    assert out[:, 1].tolist() == [2**53 + 1] * 2
    with pytest.raises(TypeError, match="uint8"):
        mean_ablation(np.zeros((2, 3), dtype=np.uint8), [0, 300, 0], [1])
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=r"mean_activations\[0\] = .*int64"):
            mean_ablation(np.zeros((2, 2), dtype=np.int64), [bad, 0], [0])


# -- float dtypes and extreme values ------------------------------------------------------
@given(
    st.sampled_from([np.float16, np.float32, np.float64]),
    st.lists(st.one_of(st.floats(width=16), extreme_floats), min_size=4, max_size=4),
    st.one_of(st.floats(width=64), st.integers(-(10**400), 10**400), st.fractions()),
    st.booleans(),
)
@settings(max_examples=400, deadline=None)
def test_float_dtypes_round_like_a_cast_or_refuse_overflow(dtype, vals, m, as_torch):
    x = np.asarray(vals, dtype=np.float64).astype(dtype).reshape(2, 2)
    r = round(m, 6)
    try:
        f = float(r)
    except OverflowError:
        f = None
    with np.errstate(over="ignore"):
        cast = None if f is None else np.asarray(f, dtype=dtype)
    overflow = f is None or (math.isfinite(f) and not np.isfinite(cast))
    arg = torch.from_numpy(x.copy()) if as_torch else x
    if overflow:
        with pytest.raises(UnrepresentableValueError, match="too large"):
            mean_ablation(arg, [m, 0.0], [0])
        return
    got = mean_ablation(arg, [m, 0.0], [0])
    got = got.numpy() if as_torch else got
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got[:, 0], np.full(2, cast, dtype=dtype))
    np.testing.assert_array_equal(got[:, 1], x[:, 1])  # NaN and inf passed through


# -- compute_ablation_effect ----------------------------------------------------------------
@given(
    st.integers(0, 6).flatmap(
        lambda d: st.tuples(
            st.lists(maybe_decimal, min_size=d, max_size=d),
            st.lists(maybe_decimal, min_size=d, max_size=d),
        )
    )
)
@settings(max_examples=500, deadline=None)
def test_effect_is_the_reference_or_a_documented_error(pair):
    a, b = pair
    if any(isinstance(v, Decimal) for v in a + b):
        with pytest.raises(TypeError, match="Decimal"):
            compute_ablation_effect(a, b)
        return
    # numpy scalars are read as Python numbers (documented): no uint8 wrap, no float32 inf.
    py = [[v.item() if isinstance(v, np.generic) else v for v in r] for r in (a, b)]
    try:
        want = reference_effect(*py)
    except OverflowError:
        with pytest.raises(NumericOverflowError, match="original_output and ablated_output"):
            compute_ablation_effect(a, b)
        return
    assert same(compute_ablation_effect(a, b), want)


def test_numpy_scalars_in_lists_do_not_wrap():
    assert compute_ablation_effect([np.uint8(0)], [np.uint8(1)]) == 1.0
    big = float(np.float32(3e38))
    assert compute_ablation_effect([np.float32(3e38)], [np.float32(-3e38)]) == 2 * big
    assert compute_ablation_effect([np.True_], [np.False_]) == 1.0


def test_overflow_is_both_documented_types():
    with pytest.raises(OverflowError):
        compute_ablation_effect([10**400], [0])
    with pytest.raises(ValueError, match="too large for a float"):
        compute_ablation_effect([10**400], [0])


def test_numpy_subclasses_are_refused():
    m = np.matrix([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match=r"numpy.matrix.*np.asarray\(activations\)"):
        mean_ablation(m, [0.0, 5.0], [1])
    with pytest.raises(TypeError, match="original_output"):
        compute_ablation_effect(m, np.asarray(m))
    with pytest.raises(TypeError, match="MaskedArray"):
        mean_ablation(np.ma.masked_array(np.zeros((2, 2))), [0.0, 5.0], [1])
