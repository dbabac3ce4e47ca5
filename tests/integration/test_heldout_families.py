"""Hugging Face architectures that no family describes, against plain torch hooks.

GPT-J, OPT, GPT-Neo, Phi, Phi-3, Gemma, Gemma 2, Falcon, BLOOM, CodeGen, Qwen3, StableLM,
OLMo, Granite, Cohere, Starcoder2, GPT-BigCode, RoBERTa, DistilBERT, ELECTRA (and Mistral,
Qwen2 of the Llama family), each built from a tiny random config: ``compute_means``,
``sweep`` (fast and not), ``ablation_effect`` and ``SetMetric`` (the set scoring behind
``discover``) must give what a reference with plain forward hooks gives (in
``tests/heldout_reference.py``) — exactly for accuracy, to 1e-6 for KL / logit difference /
loss — on heads (a flat view of the attention output projection's input), neurons, an MLP
output and a position.
Structurally Llama-like classes (Gemma, Qwen3, OLMo, Granite) are named as Llama but never
resumed (their forwards scale or cap outside the layers).
"""

from __future__ import annotations

import pytest
import torch

import meanablate as ma
from meanablate.discovery import SetMetric
from meanablate.families import family_of

pytest.importorskip("transformers")
from heldout_reference import (
    LLAMA_NAMED,
    METRICS,
    NH,
    PARAMS,
    RESUMED,
    B,
    _batches,
    _check,
    _model,
    _ref_effect,
    _ref_logits,
    _ref_mean,
    _ref_metric,
    _run,
    _units,
)


# -- the matrix -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PARAMS)
def test_family_is_recognised_only_where_it_is_known(name: str) -> None:
    family = family_of(_model(name))
    assert family.name == ("hf_llama" if name in LLAMA_NAMED else "generic")
    assert family.can_resume() == (name in RESUMED)
    if family.name == "generic":
        with pytest.raises(TypeError, match="no known model family"):
            ma.transformer_units(_model(name), "heads")
    else:
        heads = ma.transformer_units(_model(name), "heads")
        assert len(heads) == 2 * NH
        for unit in heads:  # every listed unit indexes a real head of a real module
            site = ma.parse_site(unit)
            _model(name).get_submodule(site.module)
            assert site.heads is not None and max(site.heads) < NH


@pytest.mark.parametrize("method", ["mean", "zero"])
@pytest.mark.parametrize("name", PARAMS)
def test_heldout_family_equals_plain_hooks(name: str, method: str) -> None:
    model, batches = _model(name), _batches(name)
    table = _units(name)
    units = list(table)
    keys = sorted({ma.parse_site(u).key for u in units})
    means = ma.compute_means(model, keys, batches) if method == "mean" else None
    if means is not None:
        for unit, (module, io, _sel) in table.items():
            got = means[ma.parse_site(unit).key]
            torch.testing.assert_close(got, _ref_mean(name, module, io), rtol=1e-9, atol=1e-9)
    cleans = [_run(model, b) for b in batches]
    logits = {
        (u, i): _ref_logits(name, [u], method, b) for u in units for i, b in enumerate(batches)
    }
    moved = max(float((logits[u, i] - cleans[i]).abs().max()) for u, i in logits)
    assert moved > 1e-3  # the ablations move the output: the comparison can fail
    both = [units[0], units[2]]  # a head and an MLP together
    both_logits = [_ref_logits(name, both, method, b) for b in batches]
    for metric in METRICS:
        want = torch.stack(
            [
                torch.cat([_ref_effect(metric, logits[u, i], c, b) for i, (b, c) in
                           enumerate(zip(batches, cleans))])
                for u in units
            ]
        )  # fmt: skip
        fast = ma.sweep(model, batches, units, means, metric=metric, method=method)
        _check(metric, fast.per_example, want, f"sweep {metric}")
        if metric in ("kl", "accuracy"):
            full = ma.sweep(model, batches, units, means, metric=metric, method=method, fast=False)
            _check(metric, full.per_example, want, f"sweep fast=False {metric}")
            eff = ma.ablation_effect(
                model, batches[0], units[0], means, metric=metric, method=method, n_boot=4
            )
            _check(metric, eff.per_example, want[0, :B], f"ablation_effect {metric}")
        scorer = SetMetric(model, batches, units, means, metric, method=method)
        ref = torch.cat(
            [_ref_metric(metric, z, c, b) for z, c, b in zip(both_logits, cleans, batches)]
        )
        _check(metric, scorer(both), ref, f"SetMetric {metric}")
