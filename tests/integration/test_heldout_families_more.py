"""Held-out architectures beyond the matrix: attribution against autograd through plain
hooks, resample ablation against plain hooks, nnsight-wrapped models, and an encoder with
no LM head (T5). Models and reference: ``tests/heldout_reference.py``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import meanablate as ma

pytest.importorskip("transformers")
from heldout_reference import (
    NH,
    VOCAB,
    _available,
    _batch,
    _batches,
    _check,
    _grab,
    _model,
    _ref_effect,
    _ref_mean,
    _ref_metric,
    _replace,
    _run,
    _units,
    transformers,
)


def _ref_attribution(name: str, unit: str, metric: str, batch: dict) -> Tensor:
    """``(mean - act) · dmetric/dact`` over the unit's entries, per example, by autograd."""
    model = _model(name)
    module, io, sel = _units(name)[unit]
    leaf: list[Tensor] = []

    def swap(x: Tensor) -> Tensor:
        leaf.append(x.detach().clone().requires_grad_(True))
        return leaf[0].clone()  # not the leaf itself: Falcon adds into it in place

    mod = model.get_submodule(module)
    if io == "in":
        h = mod.register_forward_pre_hook(lambda _m, a: (swap(a[0]), *a[1:]))
    else:

        def post(_m: nn.Module, _a: Any, out: Any) -> Any:
            return (swap(out[0]), *out[1:]) if isinstance(out, tuple) else swap(out)

        h = mod.register_forward_hook(post)
    try:
        with torch.enable_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            value = _ref_metric(metric, logits.logits, logits.logits.detach(), batch)
            (grad,) = torch.autograd.grad(value.sum(), leaf[0])
    finally:
        h.remove()
    act = leaf[0].detach()
    mean = _ref_mean(name, module, io).to(act.dtype).expand_as(act)
    diff = (_replace(act, mean, sel) - act).double() * grad.double()
    return diff.flatten(1).sum(1)


@pytest.mark.parametrize("name", ["gptj", "falcon", "qwen3", "roberta", "mistral"])
def test_attribution_equals_autograd_through_plain_hooks(name: str) -> None:
    if not _available(name):
        pytest.skip("not in transformers")
    model, batches = _model(name), _batches(name)
    units = list(_units(name))
    means = ma.compute_means(model, sorted({ma.parse_site(u).key for u in units}), batches)
    for metric in ("logit_diff", "loss"):
        got = ma.attribute(model, batches, units, means, metric=metric)
        want = torch.stack(
            [torch.cat([_ref_attribution(name, u, metric, b) for b in batches]) for u in units]
        )
        assert float(want.abs().max()) > 1e-4
        torch.testing.assert_close(got.per_example, want, rtol=1e-5, atol=1e-6)


def _ref_resample_logits(name: str, unit: str, batch: dict, source: dict) -> Tensor:
    model = _model(name)
    module, io, sel = _units(name)[unit]
    src = _grab(model, module, io, source)
    mod = model.get_submodule(module)
    if io == "in":
        h = mod.register_forward_pre_hook(lambda _m, a: (_replace(a[0], src, sel), *a[1:]))
    else:

        def post(_m: nn.Module, _a: Any, out: Any) -> Any:
            x = out[0] if isinstance(out, tuple) else out
            new = _replace(x, src, sel)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        h = mod.register_forward_hook(post)
    try:
        return _run(model, batch)
    finally:
        h.remove()


@pytest.mark.parametrize("name", ["gptj", "falcon", "bloom", "opt", "roberta", "qwen2"])
def test_resample_equals_plain_hooks(name: str) -> None:
    if not _available(name):
        pytest.skip("not in transformers")
    model, batches = _model(name), _batches(name)
    units = list(_units(name))
    # each batch's counterfactual: the other batch's ids, with this batch's padding
    paired = [dict(b, corrupt=batches[1 - i]["input_ids"]) for i, b in enumerate(batches)]
    sources = [dict(b, input_ids=batches[1 - i]["input_ids"]) for i, b in enumerate(batches)]
    cleans = [_run(model, b) for b in batches]
    for metric in ("kl", "accuracy"):
        want = torch.stack(
            [
                torch.cat(
                    [
                        _ref_effect(metric, _ref_resample_logits(name, u, b, s), c, b)
                        for b, s, c in zip(batches, sources, cleans)
                    ]
                )
                for u in units
            ]
        )
        got = ma.sweep(model, paired, units, None, metric=metric, method="resample")
        _check(metric, got.per_example, want, f"resample sweep {metric}")
        if metric == "kl":
            assert float(want.min()) > 0  # every unit moves the output


@pytest.mark.parametrize("name", ["gptj", "falcon", "mistral"])
def test_nnsight_wrapped_heldout_model_gives_the_same_numbers(name: str) -> None:
    nnsight = pytest.importorskip("nnsight")
    if not _available(name):
        pytest.skip("not in transformers")
    model, batches = _model(name), _batches(name)
    units = list(_units(name))
    keys = sorted({ma.parse_site(u).key for u in units})
    raw = ma.sweep(model, batches, units, ma.compute_means(model, keys, batches), metric="kl")
    wrapped = nnsight.NNsight(model)
    means = ma.compute_means(wrapped, keys, batches)
    got = ma.sweep(wrapped, batches, units, means, metric="kl")
    assert torch.equal(got.per_example, raw.per_example)
    assert float(raw.per_example.abs().max()) > 0


def test_t5_encoder_without_logits_equals_plain_hooks() -> None:
    """An encoder with no LM head: the metric reads ``last_hidden_state`` (``l2``)."""
    if not hasattr(transformers, "T5EncoderModel"):
        pytest.skip("not in transformers")
    cfg = transformers.T5Config(
        vocab_size=VOCAB, num_layers=2, d_model=16, num_heads=NH, d_kv=4, d_ff=24
    )
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(cfg).eval()
    batches = [
        {k: v for k, v in _batch(s, True).items() if k in ("input_ids", "attention_mask")}
        for s in (1, 2)
    ]
    unit = f"encoder.block.0.layer.0.SelfAttention.o@input[heads=1;n_heads={NH}]"
    key = ma.parse_site(unit).key
    means = ma.compute_means(model, [key], batches)
    mod = model.get_submodule(key.removesuffix("@input"))
    acts: list[Tensor] = []
    h = mod.register_forward_pre_hook(lambda _m, a: acts.append(a[0].detach().clone()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    keep = [b["attention_mask"].bool() for b in batches]
    mean = torch.cat([a[k] for a, k in zip(acts, keep)]).double().mean(0)
    torch.testing.assert_close(means[key], mean)

    def ablated(b: dict) -> Tensor:
        def pre(_m: nn.Module, a: tuple) -> tuple:
            return (_replace(a[0], mean.float().expand_as(a[0]), ("head", 1)),)

        h = mod.register_forward_pre_hook(pre)
        try:
            with torch.no_grad():
                return model(**b).last_hidden_state
        finally:
            h.remove()

    with torch.no_grad():
        want = torch.cat(
            [
                ((ablated(b) - model(**b).last_hidden_state).double().pow(2).sum(-1) * k)
                .sum(1)
                .sqrt()
                for b, k in zip(batches, keep)
            ]
        )
    assert float(want.min()) > 0
    got = ma.sweep(model, batches, [unit], means, metric="l2")
    torch.testing.assert_close(got.per_example[0], want, rtol=1e-6, atol=1e-7)
