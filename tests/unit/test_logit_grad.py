"""Closed-form metric gradients at the logits against autograd through the metric."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meanablate.discovery.logit_grad import logit_grad
from meanablate.metrics import get_metric


def _autograd(metric, logits, batch):
    x = logits.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = get_metric(metric)(x, batch, None)
        return torch.autograd.grad(value.sum(), x)[0]


def _batch(gen, b, p, vocab, two_d, masked):
    shape = (b,) if two_d else (b, p)
    target = torch.randint(0, vocab, shape, generator=gen)
    wrong = torch.randint(0, vocab, shape, generator=gen)
    batch = {"target": target, "wrong": wrong}
    if masked and not two_d:
        target[:, 0] = -100  # ignored positions (each example keeps its last one)
        if p > 2:
            mm = torch.ones(b, p, dtype=torch.long)
            mm[:, :2] = 0  # the ignored targets too: the mask replaces the -100 rule
            batch["metric_mask"] = mm
    return batch


@settings(max_examples=30, deadline=None)
@given(
    metric=st.sampled_from(["loss", "logit_diff", "prob"]),
    b=st.integers(1, 3),
    p=st.integers(2, 5),
    vocab=st.integers(2, 9),
    two_d=st.booleans(),
    masked=st.booleans(),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_closed_form_equals_autograd(metric, b, p, vocab, two_d, masked, double, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    shape = (b, vocab) if two_d else (b, p, vocab)
    logits = (torch.randn(shape, generator=gen) * 3).to(dtype)
    batch = _batch(gen, b, p, vocab, two_d, masked)
    got = logit_grad(get_metric(metric), logits, batch, None)
    want = _autograd(metric, logits, batch)
    assert got is not None and got.shape == logits.shape and got.dtype == dtype
    tol = 1e-12 if double else 1e-6
    assert torch.allclose(got, want, atol=tol, rtol=tol)


def test_other_metrics_fall_back_and_bad_batches_fail_as_the_metric_does():
    logits = torch.randn(2, 3, 5)
    batch = {"target": torch.zeros(2, 3, dtype=torch.long)}
    assert logit_grad(get_metric("mse"), logits, batch, None) is None
    assert logit_grad(get_metric(lambda lg, bt, c: lg.sum((1, 2))), logits, batch, None) is None
    with pytest.raises(ValueError, match="target classes must lie in"):
        logit_grad(get_metric("loss"), logits, {"target": torch.full((2, 3), 7)}, None)
    with pytest.raises(ValueError, match="needs batch\\['wrong'\\]"):
        logit_grad(get_metric("logit_diff"), logits, batch, None)
    short = {"target": torch.zeros(2, 4, dtype=torch.long)}
    with pytest.raises(ValueError):
        logit_grad(get_metric("loss"), logits, short, None)
