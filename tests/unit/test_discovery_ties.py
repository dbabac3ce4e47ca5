"""The fast path equals the hooked forward exactly, ties included.

Discrete metrics read an argmax: on an exact tie of the ablated logits the last bit
decides, so every fast route (the sweep's, SetMetric's used by every ``discover``
algorithm) must give what a plain hooked forward gives, bit for bit. The references
here are plain ``register_forward_hook`` hooks written with indexing (no meanablate
code), and the cases are built so that the old linear shortcut
``clean + (fill - act) @ W`` demonstrably breaks the tie the other way.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import meanablate as ma
from meanablate.discovery import SetMetric, discover, sweep
from meanablate.intervene import ablation_effect
from meanablate.metrics import METRICS
from meanablate.organisms import HookedTransformer, TransformerConfig
from meanablate.stats import Means
from reference import parse_unit

IGNORE = -100


# -- the plain-torch reference -------------------------------------------------------------
def _replaced(act: torch.Tensor, sel: dict, fill: torch.Tensor | None) -> torch.Tensor:
    """``act`` with the selected entries set to ``fill`` (``None``: zero), by indexing."""
    mask = torch.zeros(act.shape[1:], dtype=torch.bool)
    for p in sel.get("pos", range(act.shape[1])):
        if "heads" in sel:
            for h in sel["heads"]:
                mask[p, h] = True
        elif "neurons" in sel:
            for n in sel["neurons"]:
                mask[p, ..., n] = True
        else:
            mask[p] = True
    full = torch.zeros_like(act) if fill is None else fill.to(act.dtype).expand(act.shape)
    out = act.clone()
    out[:, mask] = full[:, mask]
    return out


def hooked_logits(
    model: nn.Module, batch: dict, units: list[str], means: Means | None
) -> torch.Tensor:
    """The model's logits with ``units`` ablated together, through plain torch hooks."""
    handles = []
    for unit in units:
        module, sel = parse_unit(unit)

        def hook(_m, _a, out, sel=sel, module=module):
            fill = None
            if means is not None:
                fill = means.tensors[module]
                if means.per_position:
                    fill = fill[: out.shape[1]]
            return _replaced(out, sel, fill)

        handles.append(model.get_submodule(module).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(batch["tokens"], batch.get("attention_mask"))
    finally:
        for h in handles:
            h.remove()


# -- a hand-made model whose ablated logits tie exactly ------------------------------------
def tie_model(w: float, r: float = 0.1) -> HookedTransformer:
    """One attention-only layer, one head, no norms; d_model 2 = [x, d], classes 2.

    The embedding puts ``r`` on ``d``; the head writes ``z @ W_O`` there (``W_O[0] =
    [0, w]``). ``logit0 = resid_d`` and ``logit1 = b_U[1] = r``: with the head ablated
    to zero the two logits are exactly equal (a tie, argmax 0).
    """
    cfg = TransformerConfig(
        n_layers=1, d_model=2, n_heads=1, d_head=2, d_vocab=3, n_ctx=4, d_vocab_out=2
    )
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[:, 0] = torch.tensor([0.3, -1.7, 2.5])  # x varies, d is untouched
        model.W_pos[:, 1] = r
        attn = model.blocks[0].attn
        attn.b_V[0] = torch.tensor([1.0, 0.5])
        attn.W_O[0] = torch.tensor([[0.0, w], [0.0, w / 3]])
        model.W_U[1, 0] = 1.0
        model.b_U[1] = r
    return model


def linear_shortcut_logits(model: HookedTransformer, batch: dict) -> torch.Tensor:
    """The old fast path: clean stream + (0 - z) @ W_O, then unembed (what broke ties)."""
    store = {}
    h1 = model.blocks[0].attn.hook_z.register_forward_hook(
        lambda _m, _a, out: store.__setitem__("z", out)
    )
    h2 = model.blocks[0].hook_resid_post.register_forward_hook(
        lambda _m, _a, out: store.__setitem__("post", out)
    )
    try:
        with torch.no_grad():
            model(batch["tokens"])
    finally:
        h1.remove()
        h2.remove()
    attn = model.blocks[0].attn
    delta = torch.einsum("bphe,hed->bpd", -store["z"], attn.W_O.detach())
    with torch.no_grad():
        return model.unembed(store["post"] + delta)


UNIT = "blocks.0.attn.hook_z[heads=0]"


@pytest.fixture(scope="module")
def tie_case():
    """A ``w`` for which the shortcut's rounding residue breaks the tie towards class 1."""
    tokens = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1], [1, 0, 0, 2]])
    # target 1: the class the shortcut's residue picks at the tie (the forward picks 0)
    batch = {"tokens": tokens, "target": torch.ones_like(tokens)}
    for w in torch.linspace(0.1, 3.0, 400).tolist():
        model = tie_model(w)
        ablated = hooked_logits(model, batch, [UNIT], None)
        assert torch.equal(ablated[..., 0], ablated[..., 1])  # the tie is exact
        short = linear_shortcut_logits(model, batch)
        if (short.argmax(-1) != ablated.argmax(-1)).any():
            clean = hooked_logits(model, batch, [], None)
            assert (clean.argmax(-1) == 0).all()  # clean: the head's write wins
            return model, batch
    pytest.fail("no weight found where the linear shortcut breaks the tie")


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_exact_tie_every_route_equals_the_hooked_forward(tie_case, method) -> None:
    model, batch = tie_case
    means = None
    if method == "mean":  # a zero mean: the same tie through the mean route
        means = Means({"blocks.0.attn.hook_z": torch.zeros(1, 2, dtype=torch.float64)}, {})
    clean = hooked_logits(model, batch, [], None)
    ref_logits = hooked_logits(model, batch, [UNIT], means)
    acc = METRICS["accuracy"]
    ref = acc(ref_logits, batch) - acc(clean, batch)
    shortcut = acc(linear_shortcut_logits(model, batch), batch) - acc(clean, batch)
    assert not torch.equal(shortcut, ref)  # the case tells the two routes apart

    fast = sweep(model, [batch], [UNIT], means, metric="accuracy", method=method)
    # stacked copies would change the batch's shapes: discrete metrics never stack
    stacked = sweep(
        model,
        [batch],
        [UNIT, "blocks.0.attn.hook_z[heads=0;pos=1]"],
        means,
        metric="accuracy",
        method=method,
        stack=2,
    )
    slow = sweep(model, [batch], [UNIT], means, metric="accuracy", method=method, fast=False)
    effect = ablation_effect(model, batch, UNIT, means, metric="accuracy", method=method)
    sm = SetMetric(model, [batch], [UNIT], means, "accuracy", method=method)
    assert sm.plans  # the fast route is the one under test
    assert torch.equal(fast.per_example[0], ref)
    assert torch.equal(stacked.per_example[0], ref)
    assert torch.equal(slow.per_example[0], ref)
    assert torch.equal(effect.per_example, ref)
    assert torch.equal(sm([UNIT]), acc(ref_logits, batch))


# -- the tracr organism of issue 12 --------------------------------------------------------
@pytest.fixture(scope="module")
def reverse():
    from meanablate.organisms.tracr_models import exhaustive_batches

    org = ma.organisms.load("tracr-reverse")
    batches = exhaustive_batches(org.card)
    keys = sorted({parse_unit(u)[0] for u in org.units})
    means = ma.compute_means(org.model, keys, batches, per_position=False)
    return org, batches, means


def test_tracr_reverse_output_head_tie(reverse) -> None:
    org, batches, means = reverse
    model, unit = org.model, "blocks.3.attn.hook_z[heads=0]"
    batch = batches[0]
    acc = METRICS["accuracy"]
    ref_logits = hooked_logits(model, batch, [unit], means)
    clean = hooked_logits(model, batch, [], None)
    ref = acc(ref_logits, batch) - acc(clean, batch)
    assert float(acc(ref_logits, batch).mean()) == pytest.approx(1 / 3)  # the 0.333
    fast = sweep(model, batches, [unit], means, metric="accuracy")
    slow = sweep(model, batches, [unit], means, metric="accuracy", fast=False)
    effect = ablation_effect(model, batch, unit, means, metric="accuracy")
    sm = SetMetric(model, batches, org.units, means, "accuracy")
    assert torch.equal(fast.per_example[0], ref)
    assert torch.equal(slow.per_example[0], ref)
    assert torch.equal(effect.per_example, ref)
    assert torch.equal(sm([unit]), acc(ref_logits, batch))
    # every unit and a few sets, all exact
    every = sweep(model, batches, org.units, means, metric="accuracy")
    stacked = sweep(model, batches, org.units, means, metric="accuracy", stack=4)
    for i, u in enumerate(org.units):
        want = acc(hooked_logits(model, batch, [u], means), batch) - acc(clean, batch)
        assert torch.equal(every.per_example[i], want), u
        assert torch.equal(stacked.per_example[i], want), u
    for subset in (org.units[:3], org.units[2:7:2], org.units[5:]):
        want = acc(hooked_logits(model, batch, subset, means), batch)
        assert torch.equal(sm(subset), want), subset


@pytest.mark.parametrize("algorithm", ["sweep", "attribute_verify", "acdc"])
def test_tracr_reverse_discover_keeps_the_output_head(reverse, algorithm) -> None:
    org, batches, means = reverse
    kw = {"threshold": 0.01} if algorithm == "acdc" else {}
    circuit = discover(
        org.model, batches, means, units=org.units, metric="accuracy", algorithm=algorithm, **kw
    )
    # without the output head the circuit scores 1/3 of the tasks' positions, not all
    assert "blocks.3.attn.hook_z[heads=0]" in circuit.kept
    kept = set(circuit.kept)
    ablated = [u for u in org.units if u not in kept]
    acc = METRICS["accuracy"]
    got = float(acc(hooked_logits(org.model, batches[0], ablated, means), batches[0]).mean())
    full = float(acc(hooked_logits(org.model, batches[0], [], means), batches[0]).mean())
    empty_units = list(org.units)
    empty = float(acc(hooked_logits(org.model, batches[0], empty_units, means), batches[0]).mean())
    assert circuit.faithfulness == pytest.approx((got - empty) / (full - empty), abs=1e-12)


# -- random models: SetMetric and the fast sweep equal plain hooks -------------------------
def random_model(cfg: TransformerConfig, seed: int) -> HookedTransformer:
    gen = torch.Generator().manual_seed(seed)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4 + (1.0 if name.endswith(".w") else 0))
    return model


def candidate_units(cfg: TransformerConfig, seq_len: int) -> list[str]:
    units = []
    for layer in range(cfg.n_layers):
        units += [f"blocks.{layer}.attn.hook_z[heads={h}]" for h in range(cfg.n_heads)]
        units.append(f"blocks.{layer}.attn.hook_z[heads=0;pos={seq_len - 1}]")
        units.append(f"blocks.{layer}.hook_attn_out")
        units.append(f"blocks.{layer}.hook_resid_pre[pos=0]")
        units.append(f"blocks.{layer}.hook_resid_post[pos={seq_len - 1}]")
        if cfg.d_mlp:
            units.append(f"blocks.{layer}.hook_mlp_out")
            units += [f"blocks.{layer}.mlp.hook_post[neurons={n}]" for n in range(cfg.d_mlp)]
    return units


def fitting_means(model: nn.Module, keys: list[str], n_pos: int, per_position: bool, gen):
    shapes = {}
    handles = [
        model.get_submodule(k).register_forward_hook(
            lambda _m, _a, out, k=k: shapes.__setitem__(k, out.shape)
        )
        for k in keys
    ]
    with torch.no_grad():
        model(torch.zeros(1, n_pos, dtype=torch.long))
    for h in handles:
        h.remove()
    tensors = {
        k: torch.randn(((n_pos,) if per_position else ()) + tuple(s[2:]), generator=gen).double()
        for k, s in shapes.items()
    }
    return Means(tensors, {k: torch.tensor(1.0) for k in tensors}, per_position)


@st.composite
def random_cases(draw):
    cfg = TransformerConfig(
        n_layers=draw(st.integers(1, 3)),
        d_model=8,
        n_heads=draw(st.integers(1, 3)),
        d_head=3,
        d_vocab=7,
        n_ctx=6,
        d_mlp=draw(st.sampled_from([None, 4])),
        d_vocab_out=draw(st.sampled_from([None, 3])),
        act_fn=draw(st.sampled_from(["relu", "gelu"])),
        normalization=draw(st.sampled_from([None, "LN"])),
        causal=draw(st.booleans()),
    )
    seq_len = draw(st.integers(2, 6))
    units = candidate_units(cfg, seq_len)
    sets = draw(st.lists(st.lists(st.sampled_from(units), max_size=4, unique=True), max_size=3))
    return {
        "cfg": cfg,
        "seq_len": seq_len,
        "units": units,
        "sets": sets,
        "metric": draw(st.sampled_from(["accuracy", "kl", "logit_diff", "loss"])),
        "per_position": draw(st.booleans()),
        "last_only": draw(st.booleans()),
        "padding": draw(st.booleans()),
        "seed": draw(st.integers(0, 10_000)),
    }


def _batch(cfg: TransformerConfig, seq_len: int, case: dict, gen) -> dict:
    n = 5
    tokens = torch.randint(cfg.d_vocab, (n, seq_len), generator=gen)
    real = torch.ones(n, seq_len, dtype=torch.bool)
    batch = {"tokens": tokens}
    if case["padding"]:
        lengths = torch.randint(1, seq_len + 1, (n,), generator=gen)
        real = torch.arange(seq_len)[None] < lengths[:, None]
        batch["attention_mask"] = real.long()
    target = torch.randint(cfg.vocab_out, (n, seq_len), generator=gen)
    target[~real] = IGNORE
    if case["last_only"]:
        last = real.long().cumsum(1).argmax(1)
        keep = torch.zeros_like(real)
        keep[torch.arange(n), last] = True
        target[~keep] = IGNORE
    batch["target"] = target
    batch["wrong"] = (target.clamp_min(0) + 1) % cfg.vocab_out
    return batch


def _close(got: torch.Tensor, want: torch.Tensor, metric: str, slack: float) -> None:
    """Discrete metrics: equal, bit for bit. Continuous ones (the linear shortcut rounds
    differently): 1e-6 relative, or within ``slack``: what a change of the logits by 1e-6
    of their size can do to the value."""
    if METRICS[metric].discrete:
        assert torch.equal(got, want), (got, want)
    else:
        # (+1e-12: float64 rounding of the KL formulas at KL = 0)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=slack + 1e-12)


def _slack(metric, want: torch.Tensor, *logits: torch.Tensor) -> float:
    """A logit change e moves loss and logit_diff by <= 2e, and KL by ~ e * sqrt(2 KL)."""
    e = 1e-6 * max(float(x.abs().max()) for x in logits)
    return e * float(2 * want.abs().max()) ** 0.5 if metric.compares else 2 * e


@settings(
    max_examples=int(os.environ.get("TIES_EXAMPLES", 40)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(random_cases())
def test_fast_routes_equal_plain_hooks_on_random_models(case) -> None:
    cfg, seq_len = case["cfg"], case["seq_len"]
    gen = torch.Generator().manual_seed(case["seed"])
    model = random_model(cfg, case["seed"])
    units = case["units"]
    keys = sorted({parse_unit(u)[0] for u in units})
    means = fitting_means(model, keys, cfg.n_ctx, case["per_position"], gen)
    batch = _batch(cfg, seq_len, case, gen)
    metric = METRICS[case["metric"]]
    clean = hooked_logits(model, batch, [], None)
    swept = sweep(model, [batch], units, means, metric=metric.name)
    for i, u in enumerate(units):
        ablated = hooked_logits(model, batch, [u], means)
        want = metric.effect(ablated, batch, clean)
        _close(swept.per_example[i], want, metric.name, _slack(metric, want, clean, ablated))

    sm = SetMetric(model, [batch], units, means, metric.name)
    assert sm.plans
    for subset in case["sets"]:
        ablated = hooked_logits(model, batch, subset, means)
        want = metric(ablated, batch, clean)
        _close(sm(subset), want, metric.name, _slack(metric, want, clean, ablated))


# -- the check behind the construction -------------------------------------------------------
def test_a_replay_that_is_not_the_forward_falls_back_to_it(reverse, monkeypatch) -> None:
    """If replaying differed from the forward by one bit (a kernel that is not
    deterministic, say), the per-batch check sends sweep and SetMetric to the hooked
    forward: the discrete results stay exact."""
    from meanablate.discovery import fastpath

    org, batches, means = reverse
    model, batch = org.model, batches[0]
    real = fastpath.finish_block_from_mid

    def off_by_a_bit(block, mid):
        out = real(block, mid)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    monkeypatch.setattr(fastpath, "finish_block_from_mid", off_by_a_bit)
    plans = [fastpath.plan_unit(model, u) for u in org.units]
    state = fastpath.clean_state(model, batch["tokens"], None, sorted({p.site.key for p in plans}))
    assert not fastpath.replay_is_faithful(model, plans, state, None)

    acc = METRICS["accuracy"]
    clean = hooked_logits(model, batch, [], None)
    every = sweep(model, batches, org.units, means, metric="accuracy")
    sm = SetMetric(model, batches, org.units, means, "accuracy")
    assert sm.states is None  # every set takes the hooked forward
    for i, u in enumerate(org.units):
        ablated = hooked_logits(model, batch, [u], means)
        assert torch.equal(every.per_example[i], acc(ablated, batch) - acc(clean, batch)), u
        assert torch.equal(sm([u]), acc(ablated, batch)), u


def _resampled_logits(model: nn.Module, batch: dict, unit: str) -> torch.Tensor:
    """Logits with ``unit`` set to its activation on ``batch['corrupt']``: plain hooks."""
    module, sel = parse_unit(unit)
    store = {}
    sub = model.get_submodule(module)
    h = sub.register_forward_hook(lambda _m, _a, out: store.__setitem__("src", out))
    try:
        with torch.no_grad():
            model(batch["corrupt"])
    finally:
        h.remove()
    h = sub.register_forward_hook(lambda _m, _a, out: _replaced(out, sel, store["src"]))
    try:
        with torch.no_grad():
            return model(batch["tokens"])
    finally:
        h.remove()


def test_tracr_reverse_resample_sweep_is_exact_at_ties(reverse) -> None:
    """Resample fills (one corrupted run per batch) through the exact replay: accuracy
    equals plain hooks bit for bit on a compiled model whose ablated logits tie."""
    org, batches, _ = reverse
    model, batch = org.model, dict(batches[0])
    batch["corrupt"] = batch["tokens"].roll(1, 0)  # each example patched from another
    acc = METRICS["accuracy"]
    clean = hooked_logits(model, batch, [], None)
    fast = sweep(model, [batch], org.units, None, metric="accuracy", method="resample")
    ties = 0
    for i, u in enumerate(org.units):
        ref_logits = _resampled_logits(model, batch, u)
        top2 = ref_logits.topk(2, dim=-1).values
        ties += int((top2[..., 0] == top2[..., 1]).sum())
        assert torch.equal(fast.per_example[i], acc(ref_logits, batch) - acc(clean, batch)), u
    assert ties > 0  # the case holds exact ties: the last bit decides
    assert fast.per_example.abs().max() > 0  # the ablations move the accuracy
