"""attribute() against a finite-difference reference and against the exact sweep.

For a task metric, attribution is the first-order change of the metric when a unit's
activation moves from its value to its mean: ``d/dα m(act + α (fill - act))`` at ``α = 0``.
The reference computes exactly that by central finite differences, with a hand-written
hook and hand-written metrics, in float64 (no autograd, no library code).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meanablate.discovery import attribute, spearman, sweep
from meanablate.organisms import HookedTransformer, TransformerConfig
from meanablate.stats import Means
from reference import parse_unit

IGNORE = -100


def selected(shape: tuple[int, ...], sel: dict) -> torch.Tensor:
    """Bool mask over ``shape[1:]`` (``[pos, ...]``) of the unit's entries."""
    mask = torch.zeros(shape[1:], dtype=torch.bool)
    for p in sel.get("pos", range(shape[1])):
        if "heads" in sel:
            for h in sel["heads"]:
                mask[p, h, :] = True
        elif "neurons" in sel:
            for n in sel["neurons"]:
                mask[p, ..., n] = True
        else:
            mask[p] = True
    return mask


def hand_metric(metric: str, logits: torch.Tensor, batch: dict) -> list[float]:
    out = []
    for b in range(logits.shape[0]):
        vals = []
        for p in range(logits.shape[1]):
            t = int(batch["target"][b, p])
            if t == IGNORE:
                continue
            x = logits[b, p].double()
            if metric == "loss":
                vals.append(float(torch.logsumexp(x, 0) - x[t]))
            elif metric == "prob":
                vals.append(float(torch.softmax(x, 0)[t]))
            else:
                vals.append(float(x[t] - x[int(batch["wrong"][b, p])]))
        out.append(math.fsum(vals) / len(vals))
    return out


def moved_metric(model, batch, unit, means, metric, alpha: float) -> list[float]:
    """The metric with ``unit``'s activation moved ``alpha`` of the way to its mean."""
    module, sel = parse_unit(unit)

    def hook(_m, _a, act):
        fill = means.tensors[module]
        if means.per_position:
            fill = fill[: act.shape[1]]
        fill = fill.to(act.dtype).expand(act.shape)
        mask = selected(tuple(act.shape), sel)
        return act + alpha * torch.where(mask, fill - act, torch.zeros_like(act))

    handle = model.get_submodule(module).register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(batch["tokens"], batch.get("attention_mask"))
    finally:
        handle.remove()
    return hand_metric(metric, logits, batch)


def finite_difference(model, batches, units, means, metric, eps: float = 1e-5) -> torch.Tensor:
    rows = []
    for unit in units:
        row = []
        for batch in batches:
            up = moved_metric(model, batch, unit, means, metric, eps)
            down = moved_metric(model, batch, unit, means, metric, -eps)
            row += [(u - d) / (2 * eps) for u, d in zip(up, down)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def random_model(cfg: TransformerConfig, seed: int, scale: float = 0.5) -> HookedTransformer:
    torch.manual_seed(seed)
    model = HookedTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (name.endswith(".w")))
    return model


def units_of(cfg: TransformerConfig) -> list[str]:
    units = []
    for layer in range(cfg.n_layers):
        units += [f"blocks.{layer}.attn.hook_z[heads={h}]" for h in range(cfg.n_heads)]
        units += [f"blocks.{layer}.attn.hook_z[heads=0;pos=1]", f"blocks.{layer}.hook_attn_out"]
        units.append(f"blocks.{layer}.hook_resid_pre[pos=2]")
        if cfg.d_mlp:
            units += [f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.mlp.hook_post[neurons=1]"]
            units.append(f"blocks.{layer}.mlp.hook_post[neurons=0,2;pos=3]")
    return units


def means_for(model, units, per_position: bool, gen: torch.Generator) -> Means:
    shapes = {}
    handles = [
        model.get_submodule(k).register_forward_hook(
            lambda _m, _a, o, k=k: shapes.__setitem__(k, tuple(o.shape))
        )
        for k in {parse_unit(u)[0] for u in units}
    ]
    with torch.no_grad():
        model(torch.zeros(1, model.cfg.n_ctx, dtype=torch.long))
    for h in handles:
        h.remove()
    tensors = {
        k: torch.randn(s[1:] if per_position else s[2:], generator=gen, dtype=torch.float64)
        for k, s in shapes.items()
    }
    return Means(tensors, {k: torch.tensor(1.0) for k in tensors}, per_position)


def task_batches(cfg, n_batches, size, seq, padding: bool, gen) -> list[dict]:
    out = []
    for _ in range(n_batches):
        tokens = torch.randint(cfg.d_vocab, (size, seq), generator=gen)
        target = torch.randint(cfg.vocab_out, (size, seq), generator=gen)
        wrong = (target + 1) % cfg.vocab_out
        target[:, 0] = IGNORE
        batch = {"tokens": tokens, "target": target, "wrong": wrong}
        if padding:  # left padding, at most 2 tokens
            pad = torch.randint(0, 3, (size,), generator=gen)
            real = torch.arange(seq)[None, :] >= pad[:, None]
            batch["attention_mask"] = real.long()
            target[~real] = IGNORE
        out.append(batch)
    return out


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    metric=st.sampled_from(["loss", "logit_diff", "prob"]),
    mlp=st.booleans(),
    ln=st.booleans(),
    causal=st.booleans(),
    padding=st.booleans(),
    per_position=st.booleans(),
)
def test_attribution_equals_finite_difference(
    seed, metric, mlp, ln, causal, padding, per_position
) -> None:
    cfg = TransformerConfig(
        n_layers=2,
        d_model=8,
        n_heads=2,
        d_head=3,
        d_vocab=7,
        n_ctx=6,
        d_mlp=5 if mlp else None,
        normalization="LN" if ln else None,
        causal=causal,
        act_fn="gelu",  # smooth: a ReLU kink within ±eps would spoil the finite difference
    )
    model = random_model(cfg, seed).double()
    gen = torch.Generator().manual_seed(seed)
    units = units_of(cfg)
    means = means_for(model, units, per_position, gen)
    batches = task_batches(cfg, 2, 3, 5, padding, gen)
    want = finite_difference(model, batches, units, means, metric)
    got = attribute(model, batches, units, means, metric=metric)
    assert got.units == units and got.method == "attribution"
    assert not got.exact.any()
    torch.testing.assert_close(got.per_example, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.values, want.mean(1), atol=1e-6, rtol=1e-5)
    assert want.abs().max() > 1e-2


def test_attribution_in_float32_matches_the_float64_reference() -> None:
    cfg = TransformerConfig(
        n_layers=2, d_model=8, n_heads=2, d_head=3, d_vocab=7, n_ctx=6, d_mlp=5, normalization="LN"
    )
    model = random_model(cfg, 11)
    gen = torch.Generator().manual_seed(11)
    units = units_of(cfg)
    means = means_for(model, units, True, gen)
    batches = task_batches(cfg, 1, 4, 6, True, gen)
    got = attribute(model, batches, units, means, metric="loss")
    want = finite_difference(model.double(), batches, units, means, "loss")
    torch.testing.assert_close(got.per_example, want, atol=1e-4, rtol=1e-3)


def test_attribution_is_the_linear_part_of_the_exact_effect() -> None:
    """Shrink every fill towards the clean activation: the exact effect becomes linear."""
    cfg = TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_head=3, d_vocab=7, n_ctx=6, d_mlp=5)
    model = random_model(cfg, 5).double()
    gen = torch.Generator().manual_seed(5)
    units = [u for u in units_of(cfg) if "pos=" not in u]
    batch = task_batches(cfg, 1, 1, 5, False, gen)[0]
    # per-position means equal to this one example's activations, nudged by t * noise
    acts = {}
    handles = [
        model.get_submodule(k).register_forward_hook(
            lambda _m, _a, o, k=k: acts.__setitem__(k, o[0].detach().clone())
        )
        for k in {parse_unit(u)[0] for u in units}
    ]
    with torch.no_grad():
        model(batch["tokens"])
    for h in handles:
        h.remove()
    noise = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in acts.items()}
    t = 1e-4
    means = Means(
        {k: acts[k] + t * noise[k] for k in acts},
        {k: torch.tensor(1.0) for k in acts},
        per_position=True,
    )
    exact = sweep(model, [batch], units, means, metric="logit_diff").values
    linear = attribute(model, [batch], units, means, metric="logit_diff").values
    torch.testing.assert_close(linear, exact, atol=1e-7, rtol=1e-3)
    assert exact.abs().max() > 1e-6


def test_kl_attribution_ranks_units_like_the_exact_sweep() -> None:
    cfg = TransformerConfig(
        n_layers=2,
        d_model=16,
        n_heads=4,
        d_head=4,
        d_vocab=11,
        n_ctx=8,
        d_mlp=12,
        normalization="LN",
    )
    model = random_model(cfg, 21, scale=0.3)
    # clear effects: heads and MLPs write with very different strengths
    strengths = iter([0.01, 0.03, 0.1, 0.3, 1.0, 2.0, 0.05, 0.5, 1.5, 0.2])
    with torch.no_grad():
        for block in model.blocks:
            for h in range(cfg.n_heads):
                block.attn.W_O[h] *= next(strengths)
            block.mlp.W_out *= next(strengths)
    units = [
        f"blocks.{layer}.{u}"
        for layer in range(2)
        for u in [f"attn.hook_z[heads={h}]" for h in range(4)] + ["hook_mlp_out"]
    ]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.d_vocab, (64, 8), generator=gen)
    batches = [tokens[:32], tokens[32:]]
    from meanablate.stats import compute_means

    means = compute_means(model, units, batches, per_position=True)
    exact = sweep(model, batches, units, means, metric="kl")
    est = attribute(model, batches, units, means, metric="kl", n_probes=4, seed=0)
    rho = spearman(est.values, exact.values)
    assert rho > 0.5, (rho, est.values, exact.values)
    assert (est.values >= 0).all()
    # the probe is unbiased for 2*KL to second order: same order of magnitude overall
    ratio = float(est.values.sum() / exact.values.sum())
    assert 0.2 < ratio < 5, ratio


def test_attribution_rejects_accuracy_and_bad_arguments() -> None:
    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=3, d_vocab=7, n_ctx=6)
    model = random_model(cfg, 0)
    gen = torch.Generator().manual_seed(0)
    units = units_of(cfg)
    means = means_for(model, units, False, gen)
    batches = task_batches(cfg, 1, 3, 5, False, gen)
    with pytest.raises(ValueError, match="accuracy"):
        attribute(model, batches, units, means, metric="accuracy")
    with pytest.raises(ValueError, match="n_probes"):
        attribute(model, batches, units, means, metric="kl", n_probes=0)
    with pytest.raises(ValueError, match="at least one batch"):
        attribute(model, [], units, means, metric="loss")
    with pytest.raises(ValueError, match="no module"):
        attribute(model, batches, ["blocks.7.attn.hook_z[heads=0]"], means, metric="loss")
    # leaves no gradients or hooks behind
    attribute(model, batches, units, means, metric="loss")
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_mse_attribution_has_a_second_order_term_at_a_perfect_fit() -> None:
    """frac_prevs fits exactly (mse 0), so the linear term vanishes; the probed square
    term must still estimate each unit's effect, and zero-effect units stay at zero."""
    import meanablate as ma

    org = ma.organisms.load("tracr-frac_prevs")
    batches = org.make_batches(128, 64, 0)
    keys = sorted({ma.parse_site(u).key for u in org.units})
    means = ma.compute_means(org.model, keys, batches, per_position=True)
    exact = sweep(org.model, batches, org.units, means, metric="mse").values
    est = attribute(org.model, batches, org.units, means, metric="mse", n_probes=4).values
    assert exact.max() > 0.05
    for e, a in zip(exact.tolist(), est.tolist(), strict=True):
        assert abs(a - e) <= 0.15 * max(e, 1e-3)
