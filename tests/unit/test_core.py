"""The seed API against a naive oracle, and the array/tensor paths against the list path."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meanablate import compute_ablation_effect, mean_ablation


# -- an independent, deliberately naive oracle following the seed's semantics ---------
def oracle_ablation(acts, means, ablate, decimals=6):
    chosen = list(ablate)
    out = []
    for row in acts:
        new_row = []
        for j in range(len(row)):
            hit = False
            for k in chosen:
                if k == j:
                    hit = True
            new_row.append(round(means[j], decimals) if hit else row[j])
        out.append(new_row)
    return out


def oracle_effect(a, b, decimals=6):
    total = 0
    for i in range(len(a)):
        total = total + (a[i] - b[i]) ** 2
    return round(total**0.5, decimals)


finite = st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e6, max_value=1e6)
number = st.one_of(finite, st.integers(-1000, 1000))


@st.composite
def ablation_case(draw):
    n = draw(st.integers(1, 12))
    b = draw(st.integers(0, 6))
    acts = [[draw(number) for _ in range(n)] for _ in range(b)]
    means = [draw(number) for _ in range(n)]
    idx = draw(st.lists(st.integers(0, n - 1), max_size=2 * n))
    return acts, means, idx


@given(ablation_case())
@settings(max_examples=300, deadline=None)
def test_list_path_equals_oracle_value_and_type(case):
    acts, means, idx = case
    before = copy.deepcopy((acts, means, idx))
    got = mean_ablation(acts, means, idx)
    want = oracle_ablation(acts, means, idx)
    assert str(got) == str(want)
    assert [[type(v) for v in r] for r in got] == [[type(v) for v in r] for r in want]
    assert (acts, means, idx) == before  # never mutated


@given(ablation_case(), st.sampled_from([np.float64, np.float32]))
@settings(max_examples=200, deadline=None)
def test_numpy_and_torch_paths_equal_list_path(case, dtype):
    acts, means, idx = case
    if not acts:
        return
    arr = np.asarray(acts, dtype=dtype)
    keep = arr.copy()
    want = np.asarray(mean_ablation(arr.tolist(), means, idx), dtype=dtype)
    got = mean_ablation(arr, means, idx)
    assert got.dtype == arr.dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(arr, keep)
    t = torch.from_numpy(arr.copy())
    got_t = mean_ablation(t, torch.tensor(means, dtype=torch.float64), idx)
    assert got_t.dtype == t.dtype
    np.testing.assert_array_equal(got_t.numpy(), want)
    np.testing.assert_array_equal(t.numpy(), keep)


@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 7), st.data())
@settings(max_examples=60, deadline=None)
def test_any_leading_shape_matches_row_by_row(b, p, n, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(b, p, n)).astype(np.float32)
    means = rng.normal(size=n)
    idx = data.draw(st.lists(st.integers(0, n - 1), max_size=n))
    got = mean_ablation(x, means, idx)
    for i in range(b):
        np.testing.assert_array_equal(got[i], mean_ablation(x[i], means, idx))
    nested = mean_ablation(x.astype(np.float64).tolist(), means.tolist(), idx)
    np.testing.assert_array_equal(np.asarray(nested, dtype=np.float32), got)


def test_decimals_none_and_custom():
    acts = [[0.0, 0.0]]
    assert mean_ablation(acts, [1 / 3, 2 / 3], [0, 1], decimals=None) == [[1 / 3, 2 / 3]]
    assert mean_ablation(acts, [1 / 3, 2 / 3], [0, 1], decimals=2) == [[0.33, 0.67]]
    x = np.zeros((2, 2))
    np.testing.assert_array_equal(mean_ablation(x, [1 / 3, 1.0], [0], decimals=None)[:, 0], 1 / 3)


def test_python_round_not_numpy_round():
    # 2.675 is stored as 2.67499999...: Python's round gives 2.67, naive scaling gives 2.68.
    assert mean_ablation([[0.0]], [2.675], [0], decimals=2) == [[2.67]]
    np.testing.assert_array_equal(mean_ablation(np.zeros((1, 1)), [2.675], [0], decimals=2), 2.67)


def test_edge_cases():
    assert mean_ablation([], [1.0], [0]) == []
    assert mean_ablation([[1, 2]], [0.5, 0.5], []) == [[1, 2]]
    assert mean_ablation([[1, 2]], [0.5, 0.25], [1, 1, 1]) == [[1, 0.25]]
    assert mean_ablation([[1, 2]], [0.5, 0.25], range(2)) == [[0.5, 0.25]]
    assert mean_ablation([[1, 2]], [0.5, 0.25], np.array([1])) == [[1, 0.25]]
    assert mean_ablation([1.0, 2.0], [0.5, 0.25], [0]) == [0.5, 2.0]  # a single vector


def test_torch_keeps_device_and_dtype_and_grad_free_input():
    x = torch.randn(3, 4, 5, dtype=torch.float16)
    out = mean_ablation(x, np.arange(5.0), [4])
    assert out.dtype == torch.float16 and out.device == x.device and out.shape == x.shape
    assert torch.all(out[..., 4] == 4.0)
    assert torch.equal(out[..., :4], x[..., :4])


def test_integer_arrays():
    x = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(mean_ablation(x, [7, 8, 9], [2]), [[0, 1, 9], [3, 4, 9]])
    with pytest.raises(TypeError, match=r"mean_activations\[1\] = 8.5 .*dtype int64"):
        mean_ablation(x, [7, 8.5, 9], [1])


@pytest.mark.parametrize(
    ("acts", "means", "idx", "exc", "pattern"),
    [
        ([[1.0, 2.0], [3.0]], [0.0, 0.0], [0], ValueError, r"ragged: row \[1\] has length 1"),
        ([[1.0, [2.0]]], [0.0, 0.0], [0], ValueError, "ragged"),
        ([[1.0, 2.0]], [0.0], [0], ValueError, "1 entries but the activations have 2"),
        ([[1.0, 2.0]], [0.0, 0.0], [2], IndexError, r"\[0\] = 2 is out of range for 2"),
        ([[1.0, 2.0]], [0.0, 0.0], [-1], IndexError, "negative"),
        ([[1.0, 2.0]], [0.0, 0.0], [0.0], TypeError, "not an integer"),
        ([[1.0, 2.0]], [0.0, 0.0], [True], TypeError, "not an integer"),
        ([[1.0, 2.0]], [0.0, 0.0], "0", TypeError, "iterable of integer"),
        ([[1.0, "a"]], [0.0, 0.0], [0], TypeError, r"element \[0, 1\] is 'a'"),
        ([[1.0, None]], [0.0, 0.0], [0], TypeError, "real numbers"),
        ([[1.0, 2.0]], [0.0, "x"], [1], TypeError, "mean_activations"),
        ("abc", [0.0], [0], TypeError, "nested list"),
    ],
)
def test_bad_input_mean_ablation(acts, means, idx, exc, pattern):
    before = copy.deepcopy(acts)
    with pytest.raises(exc, match=pattern):
        mean_ablation(acts, means, idx)
    assert acts == before


def test_bad_input_arrays():
    with pytest.raises(ValueError, match="3 entries but the activations have 4"):
        mean_ablation(np.zeros((2, 4)), np.zeros(3), [0])
    with pytest.raises(ValueError, match=r"1-D with 4 entries, got shape \(2, 2\)"):
        mean_ablation(np.zeros((2, 4)), np.zeros((2, 2)), [0])
    with pytest.raises(IndexError, match="out of range"):
        mean_ablation(torch.zeros(2, 4), torch.zeros(4), torch.tensor([4]))
    with pytest.raises(TypeError, match="numeric"):
        mean_ablation(np.array([["a", "b"]]), [0.0, 0.0], [0])
    with pytest.raises(ValueError, match="scalar"):
        mean_ablation(np.ones(()), [0.0], [0])


# -- compute_ablation_effect -----------------------------------------------------------
@given(
    st.integers(0, 10).flatmap(
        lambda d: st.tuples(
            st.lists(number, min_size=d, max_size=d), st.lists(number, min_size=d, max_size=d)
        )
    )
)
@settings(max_examples=300, deadline=None)
def test_effect_equals_oracle(pair):
    a, b = pair
    before = copy.deepcopy(pair)
    got = compute_ablation_effect(a, b)
    assert type(got) is float
    assert got == oracle_effect(a, b)
    assert (a, b) == before


@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 9), st.data())
@settings(max_examples=60, deadline=None)
def test_effect_arrays_per_leading_index(b, p, d, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x, y = rng.normal(size=(2, b, p, d))
    got = compute_ablation_effect(x, y)
    assert got.shape == (b, p)
    nested = compute_ablation_effect(x.tolist(), y.tolist())
    for i in range(b):
        for j in range(p):
            assert math.isclose(
                got[i, j], oracle_effect(x[i, j].tolist(), y[i, j].tolist()), abs_tol=1.1e-6
            )
            assert nested[i][j] == oracle_effect(x[i, j].tolist(), y[i, j].tolist())
    got_t = compute_ablation_effect(torch.from_numpy(x), torch.from_numpy(y))
    assert isinstance(got_t, torch.Tensor) and got_t.shape == (b, p)
    np.testing.assert_allclose(got_t.numpy(), got, atol=1.1e-6)


def test_effect_decimals_none_keeps_gradient():
    x = torch.tensor([[3.0, 0.0]], requires_grad=True)
    d = compute_ablation_effect(x, torch.tensor([[0.0, 4.0]]), decimals=None)
    d.sum().backward()
    assert torch.allclose(d, torch.tensor([5.0], dtype=torch.float64))
    assert x.grad is not None


@pytest.mark.parametrize(
    ("a", "b", "exc", "pattern"),
    [
        ([1.0, 2.0], [1.0], ValueError, "truncates"),
        ([1.0, "2"], [1.0, 2.0], TypeError, "original_output must hold real numbers"),
        ([1.0, 2.0], [1.0, None], TypeError, "ablated_output"),
        ([1.0], np.array([1.0]), TypeError, "both"),
        (np.zeros((2, 3)), np.zeros((3, 2)), ValueError, r"\(2, 3\) but ablated_output has shape"),
        (np.zeros(()), np.zeros(()), ValueError, "at least one dimension"),
        ([[1.0, 2.0], [1.0]], [[1.0, 2.0], [1.0]], ValueError, "ragged"),
    ],
)
def test_bad_input_effect(a, b, exc, pattern):
    with pytest.raises(exc, match=pattern):
        compute_ablation_effect(a, b)
