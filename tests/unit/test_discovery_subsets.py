"""SetMetric (pruning's evaluator of ablated sets) against hooks written by hand.

The reference puts one plain ``register_forward_hook`` per unit on the model (units on
one module compose, so their selections add up) and computes the metric from its
definition; it shares no code with the fast path, which resumes from the earliest unit's
exact residual change.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from test_discovery_sweep import all_units as unit_pool
from test_discovery_sweep import (
    cases,
    make_batches,
    naive_effect,
    naive_fill,
    random_means,
    random_model,
    replaced,
)
from torch import nn

from meanablate.discovery import evaluate
from meanablate.discovery.subsets import SetMetric
from meanablate.organisms import HookedTransformer, TransformerConfig
from reference import parse_unit

ATOL = 1e-5


def naive_set_forward(model: HookedTransformer, batch: dict, units, means) -> torch.Tensor:
    handles = []
    for unit in units:
        module, sel = parse_unit(unit)

        def hook(_m, _a, out, module=module, sel=sel):
            seq = out.shape[1] if out.ndim >= 3 else None
            return replaced(out, sel, naive_fill(means, module, seq))

        handles.append(model.get_submodule(module).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(batch["tokens"], batch.get("attention_mask"))
    finally:
        for h in handles:
            h.remove()


def naive_set_effect(model, batches, units, means, metric) -> torch.Tensor:
    out = []
    for batch in batches:
        clean = naive_set_forward(model, batch, [], None)
        ablated = naive_set_forward(model, batch, units, means)
        out += naive_effect(metric, ablated, clean, batch)
    return torch.tensor(out, dtype=torch.float64)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_set_metric_equals_hand_hooks_on_random_sets(case) -> None:
    cfg = case["cfg"]
    gen = torch.Generator().manual_seed(case["seed"])
    model = random_model(cfg, case["seed"])
    pool = unit_pool(cfg, case["seq_len"], gen)
    means = random_means(model, pool, case["per_position"], cfg.n_ctx, gen)
    batches = make_batches(
        cfg, 2, 3, case["seq_len"], case["padding"], case["last_only"], case["with_target"], gen
    )
    ref_means = means if case["method"] == "mean" else None
    sm = SetMetric(model, batches, pool, means, case["metric"], method=case["method"])
    base = sm([])
    fast_sets = 0
    for size in (1, 2, 3, len(pool) // 2, len(pool)):
        pick = torch.randperm(len(pool), generator=gen)[:size].tolist()
        subset = [pool[i] for i in sorted(pick)]
        fast_sets += sm._split(subset) is not None
        want = naive_set_effect(model, batches, subset, ref_means, case["metric"])
        torch.testing.assert_close(sm(subset) - base, want, atol=ATOL, rtol=1e-5)
    assert fast_sets >= 1  # the fast path itself was checked, not only the fallback


CFG = TransformerConfig(
    n_layers=3, d_model=8, n_heads=2, d_head=3, d_vocab=7, n_ctx=5, d_mlp=6, normalization="LN"
)


@pytest.fixture(scope="module")
def setup():
    gen = torch.Generator().manual_seed(3)
    model = random_model(CFG, 3)
    pool = unit_pool(CFG, 5, gen)
    means = random_means(model, pool, True, CFG.n_ctx, gen)
    batches = make_batches(CFG, 2, 4, 5, "right", False, True, gen)
    return model, pool, means, batches


@pytest.mark.parametrize(
    "subset",
    [
        # merged into one change: neurons of one MLP, heads of one layer
        ["blocks.0.mlp.hook_post[neurons=0,5]", "blocks.0.mlp.hook_post[neurons=1]"],
        ["blocks.1.attn.hook_z[heads=0]", "blocks.1.attn.hook_z[heads=1]", "blocks.2.hook_mlp_out"],
        # a head group, then hooks at the same block's resid_mid and MLP
        ["blocks.1.attn.hook_z[heads=1]", "blocks.1.hook_resid_mid", "blocks.1.mlp.hook_post"],
        # a later whole block's output, ablated by its hook on the resumed run
        ["blocks.0.mlp.hook_post[neurons=1]", "blocks.2[pos=1]"],
        # not one linear change: a neuron and its whole MLP output, overlapping neurons
        ["blocks.0.mlp.hook_post[neurons=2]", "blocks.0.hook_mlp_out"],
        ["blocks.2.mlp.hook_post[neurons=1;pos=2]", "blocks.2.mlp.hook_post[neurons=1,2]"],
    ],
)
@pytest.mark.parametrize("metric", ["kl", "loss"])
def test_set_metric_on_hand_picked_sets(setup, subset, metric) -> None:
    model, pool, _, batches = setup
    # fill values for every activation the subset reads (whole blocks included)
    means = random_means(model, pool + subset, True, CFG.n_ctx, torch.Generator().manual_seed(5))
    sm = SetMetric(model, batches, pool + subset, means, metric)
    want = naive_set_effect(model, batches, subset, means, metric)
    torch.testing.assert_close(sm(subset) - sm([]), want, atol=ATOL, rtol=1e-5)
    assert want.abs().max() > 1e-3


def test_foreign_hooks_and_budget_take_the_full_forward(setup, monkeypatch) -> None:
    model, pool, means, batches = setup
    subset = ["blocks.0.mlp.hook_post[neurons=2]"]
    pool = [*pool, *subset]
    sm = SetMetric(model, batches, pool, means, "kl")
    assert sm._split(subset) is not None
    # a user's hook on the model would be bypassed by the fast path: it must see it
    handle = model.blocks[2].hook_resid_post.register_forward_hook(lambda m, a, o: o * 0.5)
    try:
        assert sm._split(subset) is None
        ablated = naive_set_forward(model, batches[0], subset, means)
        clean = sm.clean[0]  # type: ignore[index]
        got = sm(subset)[: len(batches[0]["tokens"])]
        want = torch.tensor(naive_effect("kl", ablated, clean, batches[0]), dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    finally:
        handle.remove()
    monkeypatch.setattr(evaluate, "CLEAN_CACHE_BYTES", 100)
    import meanablate.discovery.subsets as subsets

    monkeypatch.setattr(subsets, "CLEAN_CACHE_BYTES", 100)
    small = SetMetric(model, batches, pool, means, "kl")
    assert small.states is None and small._split(subset) is None
    torch.testing.assert_close(small(subset), sm(subset), atol=ATOL, rtol=1e-5)


def test_other_models_and_resampling_take_the_full_forward() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    batches = [torch.randn(5, 3, generator=torch.Generator().manual_seed(0))]
    sm = SetMetric(model, batches, ["1[neurons=0]"], None, "l2", method="zero")
    assert sm.states is None
    with torch.no_grad():
        clean = model(batches[0])
        h = model[1].register_forward_hook(lambda m, a, o: o.index_fill(-1, torch.tensor([0]), 0))
        ablated = model(batches[0])
        h.remove()
    torch.testing.assert_close(
        sm(["1[neurons=0]"]), (ablated - clean).double().norm(dim=-1), atol=1e-6, rtol=1e-6
    )
