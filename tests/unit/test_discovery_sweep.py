"""sweep() against a naive reference: one forward per unit with a hand-written hook.

The reference parses unit strings itself, replaces activations with plain indexing in a
``register_forward_hook`` and computes every metric from its definition, so it shares no
code with the library's ablation, fast path or metrics. Also: Ctrl-C safety of sweeps
(no hooks left behind, weights unchanged).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from meanablate.discovery import attribute, discover, sweep
from meanablate.organisms import HookedTransformer, TransformerConfig
from meanablate.stats import Means
from reference import parse_unit

IGNORE = -100
ATOL = 1e-5


def replaced(act: torch.Tensor, sel: dict, fill: torch.Tensor | None) -> torch.Tensor:
    """``act`` with the selected entries set to ``fill`` (``None``: zero), by plain loops."""
    mask = torch.zeros(act.shape[1:], dtype=torch.bool)
    has_pos = act.ndim >= 3
    positions = sel.get("pos", range(act.shape[1])) if has_pos else [None]
    for p in positions:
        row = mask[p] if p is not None else mask
        if "heads" in sel:
            for h in sel["heads"]:
                row[h, :] = True
        elif "neurons" in sel:
            for n in sel["neurons"]:
                row[..., n] = True
        else:
            row[...] = True
    full = torch.zeros_like(act) if fill is None else fill.to(act.dtype).expand(act.shape)
    out = act.clone()
    out[:, mask] = full[:, mask]
    return out


def naive_fill(means: Means | None, key: str, seq_len: int | None) -> torch.Tensor | None:
    if means is None:
        return None
    mean = means.tensors[key]
    if means.per_position:
        mean = mean[:seq_len]
    return mean


def naive_forward(model: nn.Module, batch, unit: str | None, means: Means | None) -> torch.Tensor:
    """The model's output with ``unit`` ablated (``means=None``: zero ablation)."""
    handle = None
    if unit is not None:
        module, sel = parse_unit(unit)

        def hook(_m, _a, out):
            seq = out.shape[1] if out.ndim >= 3 else None
            return replaced(out, sel, naive_fill(means, module, seq))

        handle = model.get_submodule(module).register_forward_hook(hook)
    try:
        with torch.no_grad():
            if isinstance(model, HookedTransformer):
                return model(batch["tokens"], batch.get("attention_mask"))
            return model(batch["input"] if isinstance(batch, dict) else batch)
    finally:
        if handle is not None:
            handle.remove()


def naive_scored(batch, logits: torch.Tensor) -> torch.Tensor:
    """``[b, p]`` positions read: metric_mask, else target != -100, else attention_mask."""
    if not isinstance(batch, dict):
        return torch.ones(logits.shape[:2], dtype=torch.bool)
    if "metric_mask" in batch:
        return batch["metric_mask"].bool()
    if "target" in batch:
        return batch["target"] != IGNORE
    if "attention_mask" in batch:
        return batch["attention_mask"].bool()
    return torch.ones(logits.shape[:2], dtype=torch.bool)


def naive_effect(metric: str, ablated: torch.Tensor, clean: torch.Tensor, batch) -> list[float]:
    """Per-example effect, one example and one position at a time, in float64."""
    if ablated.ndim == 2:  # [batch, vocab]: one position
        ablated, clean = ablated[:, None], clean[:, None]
        if isinstance(batch, dict):
            batch = {k: v[:, None] for k, v in batch.items() if k != "input"}
    scored = naive_scored(batch, ablated)
    out = []
    for b in range(ablated.shape[0]):
        values = []
        for p in range(ablated.shape[1]):
            if not scored[b, p]:
                continue
            a, c = ablated[b, p].double(), clean[b, p].double()
            if metric == "l2":
                values.append(float((a - c).pow(2).sum()))
                continue
            if metric == "kl":
                lp, lq = a - torch.logsumexp(a, 0), c - torch.logsumexp(c, 0)
                values.append(float((lq.exp() * (lq - lp)).sum()))
                continue
            t = int(batch["target"][b, p])
            w = int(batch["wrong"][b, p]) if "wrong" in batch else 0

            def task(x: torch.Tensor, t: int = t, w: int = w) -> float:
                if metric == "loss":
                    return float(torch.logsumexp(x, 0) - x[t])
                if metric == "prob":
                    return float(torch.softmax(x, 0)[t])
                return float(x[t] - x[w])  # logit_diff

            values.append(task(a) - task(c))
        if metric == "l2":
            out.append(math.sqrt(math.fsum(values)))
        else:
            out.append(math.fsum(values) / len(values))
    return out


def naive_sweep(model, batches, units, means, metric) -> torch.Tensor:
    rows = []
    for unit in units:
        row = []
        for batch in batches:
            clean = naive_forward(model, batch, None, None)
            ablated = naive_forward(model, batch, unit, means)
            row += naive_effect(metric, ablated, clean, batch)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


# -- random models, batches, units and means ---------------------------------------------
def random_model(cfg: TransformerConfig, seed: int, scale: float = 0.35) -> HookedTransformer:
    torch.manual_seed(seed)
    model = HookedTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
        for name, p in model.named_parameters():
            if name.endswith(".w"):  # LayerNorm gains near 1
                p.add_(1.0)
    return model


def all_units(cfg: TransformerConfig, seq_len: int, gen: torch.Generator) -> list[str]:
    def pick(n: int) -> int:
        return int(torch.randint(n, (), generator=gen))

    units = []
    for layer in range(cfg.n_layers):
        units += [f"blocks.{layer}.attn.hook_z[heads={h}]" for h in range(cfg.n_heads)]
        units.append(f"blocks.{layer}.attn.hook_z[heads={pick(cfg.n_heads)};pos={pick(seq_len)}]")
        units.append(f"blocks.{layer}.attn.hook_z")  # every head of the layer
        units.append(f"blocks.{layer}.hook_attn_out")
        units.append(f"blocks.{layer}.hook_attn_out[pos={pick(seq_len)}]")
        units.append(f"blocks.{layer}.hook_resid_pre[pos={pick(seq_len)}]")
        units.append(f"blocks.{layer}.hook_resid_pre[pos=0,{seq_len - 1}]")
        units.append(f"blocks.{layer}.hook_resid_post[pos={pick(seq_len)}]")
        if cfg.d_mlp:
            units.append(f"blocks.{layer}.hook_mlp_out")
            units.append(f"blocks.{layer}.hook_mlp_out[pos={pick(seq_len)}]")
            units.append(f"blocks.{layer}.hook_resid_mid[pos={pick(seq_len)}]")
            units.append(f"blocks.{layer}.mlp.hook_post[neurons={pick(cfg.d_mlp)}]")
            units.append(f"blocks.{layer}.mlp.hook_post[neurons=0,{cfg.d_mlp - 1}]")
            units.append(
                f"blocks.{layer}.mlp.hook_post[neurons={pick(cfg.d_mlp)};pos={pick(seq_len)}]"
            )
    return list(dict.fromkeys(units))


def random_means(
    model: nn.Module, units: list[str], per_position: bool, n_pos: int, gen: torch.Generator
) -> Means:
    """Arbitrary fill values of the right shapes (the sweep must use whatever it is given)."""
    probe = {}
    handles = []
    for key in {parse_unit(u)[0] for u in units}:

        def rec(_m, _a, out, key=key):
            probe[key] = out.shape

        handles.append(model.get_submodule(key).register_forward_hook(rec))
    with torch.no_grad():
        if isinstance(model, HookedTransformer):
            model(torch.zeros(1, n_pos, dtype=torch.long))
        else:
            model(torch.zeros(1, n_pos, model[0].in_features))
    for h in handles:
        h.remove()
    tensors = {}
    for key, shape in probe.items():
        tail = tuple(shape[2:])
        full = (n_pos, *tail) if per_position else tail
        tensors[key] = torch.randn(full, generator=gen, dtype=torch.float64)
    counts = {k: torch.tensor(1.0, dtype=torch.float64) for k in tensors}
    return Means(tensors, counts, per_position)


def make_batches(
    cfg: TransformerConfig,
    n_batches: int,
    batch_size: int,
    seq_len: int,
    padding: str,
    last_only: bool,
    with_target: bool,
    gen: torch.Generator,
) -> list[dict]:
    batches = []
    vocab = cfg.vocab_out
    for _ in range(n_batches):
        tokens = torch.randint(cfg.d_vocab, (batch_size, seq_len), generator=gen)
        batch: dict = {"tokens": tokens}
        real = torch.ones(batch_size, seq_len, dtype=torch.bool)
        if padding != "none":
            lengths = torch.randint(1, seq_len + 1, (batch_size,), generator=gen)
            lengths[0] = seq_len
            idx = torch.arange(seq_len)[None, :]
            if padding == "right":
                real = idx < lengths[:, None]
            else:
                real = idx >= (seq_len - lengths)[:, None]
            batch["attention_mask"] = real.long()
            tokens[~real] = 0
        if with_target:
            target = torch.randint(vocab, (batch_size, seq_len), generator=gen)
            wrong = (target + 1 + torch.randint(vocab - 1, target.shape, generator=gen)) % vocab
            target[~real] = IGNORE
            if seq_len > 1:
                # position 0 unscored unless it is some row's only real token
                lone = real.sum(1) == 1
                target[~lone, 0] = IGNORE
            batch["target"], batch["wrong"] = target, wrong
        if last_only:
            last = real.long().cumsum(1).argmax(1)  # last real position per row
            mm = torch.zeros(batch_size, seq_len, dtype=torch.bool)
            mm[torch.arange(batch_size), last] = True
            batch["metric_mask"] = mm
        batches.append(batch)
    return batches


METRICS = ["kl", "l2", "loss", "logit_diff", "prob"]


@st.composite
def cases(draw):
    cfg = TransformerConfig(
        n_layers=draw(st.integers(1, 2)),
        d_model=8,
        n_heads=draw(st.integers(1, 3)),
        d_head=3,
        d_vocab=7,
        n_ctx=6,
        d_mlp=draw(st.sampled_from([None, 5])),
        d_vocab_out=draw(st.sampled_from([None, 4])),
        act_fn=draw(st.sampled_from(["relu", "gelu"])),
        normalization=draw(st.sampled_from([None, "LN"])),
        causal=draw(st.booleans()),
    )
    metric = draw(st.sampled_from(METRICS))
    return {
        "cfg": cfg,
        "metric": metric,
        "method": draw(st.sampled_from(["mean", "zero"])),
        "per_position": draw(st.booleans()),
        "stack": draw(st.sampled_from([1, 3])),
        "seq_len": draw(st.integers(2, 6)),
        "padding": draw(st.sampled_from(["none", "left", "right"])),
        "last_only": draw(st.booleans()),
        "with_target": metric not in ("kl", "l2") or draw(st.booleans()),
        "seed": draw(st.integers(0, 10_000)),
    }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_sweep_equals_naive_loop_on_random_transformers(case) -> None:
    cfg = case["cfg"]
    gen = torch.Generator().manual_seed(case["seed"])
    model = random_model(cfg, case["seed"])
    seq_len = case["seq_len"]
    units = all_units(cfg, seq_len, gen)
    means = random_means(model, units, case["per_position"], cfg.n_ctx, gen)
    batches = make_batches(
        cfg, 2, 3, seq_len, case["padding"], case["last_only"], case["with_target"], gen
    )
    ref_means = means if case["method"] == "mean" else None
    want = naive_sweep(model, batches, units, ref_means, case["metric"])
    for fast in (True, False):
        got = sweep(
            model,
            batches,
            units,
            means,
            metric=case["metric"],
            method=case["method"],
            stack=case["stack"],
            fast=fast,
        )
        assert got.units == units
        assert got.per_example.shape == (len(units), 6)
        torch.testing.assert_close(got.per_example, want, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(got.values, want.mean(1), atol=ATOL, rtol=1e-5)
    # the units do something (a test of all-zero effects would prove little)
    assert want.abs().max() > 1e-3


def test_sweep_is_not_trivial_at_the_last_position_with_stacking() -> None:
    """A fixed case with every kind of unit: fast path, stack 3, last position, padding."""
    cfg = TransformerConfig(
        n_layers=2,
        d_model=8,
        n_heads=2,
        d_head=3,
        d_vocab=7,
        n_ctx=6,
        d_mlp=5,
        normalization="LN",
    )
    gen = torch.Generator().manual_seed(3)
    model = random_model(cfg, 3)
    units = all_units(cfg, 5, gen)
    means = random_means(model, units, True, 6, gen)
    batches = make_batches(cfg, 2, 4, 5, "right", True, True, gen)
    for metric in METRICS:
        want = naive_sweep(model, batches, units, means, metric)
        got = sweep(model, batches, units, means, metric=metric, stack=3)
        torch.testing.assert_close(got.per_example, want, atol=ATOL, rtol=1e-5)
        assert (want.abs() > 1e-4).float().mean() > 0.8


def test_sweep_with_a_foreign_hook_on_the_model_still_matches() -> None:
    """A hook already on the model changes the forward; the sweep must see it too."""
    cfg = TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_head=3, d_vocab=7, n_ctx=6, d_mlp=5)
    gen = torch.Generator().manual_seed(4)
    model = random_model(cfg, 4)
    units = all_units(cfg, 4, gen)
    means = random_means(model, units, False, 6, gen)
    batches = make_batches(cfg, 1, 3, 4, "none", False, True, gen)
    handle = model.blocks[0].hook_resid_post.register_forward_hook(lambda _m, _a, o: o * 0.5)
    try:
        want = naive_sweep(model, batches, units, means, "loss")
        got = sweep(model, batches, units, means, metric="loss")
    finally:
        handle.remove()
    torch.testing.assert_close(got.per_example, want, atol=ATOL, rtol=1e-5)


# -- the generic path: any nn.Module -----------------------------------------------------
def sequential(seed: int, d_in: int = 5, hidden: int = 8, out: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, out),
    ).eval()


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    metric=st.sampled_from(METRICS),
    method=st.sampled_from(["mean", "zero"]),
    per_position=st.booleans(),
    seq=st.booleans(),
    stack=st.sampled_from([1, 3]),
)
def test_sweep_equals_naive_loop_on_sequential(seed, metric, method, per_position, seq, stack):
    per_position = per_position and seq
    model = sequential(seed)
    gen = torch.Generator().manual_seed(seed)
    units = ["0[neurons=1]", "1[neurons=0,3]", "2", "3[neurons=7]", "4[neurons=2]", "1"]
    if seq:
        units += ["1[neurons=2;pos=1]", "3[pos=0]"]
    shape = (6, 3, 5) if seq else (6, 5)
    means = random_means(model, units, per_position, 3, gen)
    x = torch.randn(shape, generator=gen)
    needs_target = metric not in ("kl", "l2")
    if needs_target:
        target = torch.randint(4, shape[:-1], generator=gen)
        wrong = (target + 1) % 4
        batches = [
            {"input": x[:3], "target": target[:3], "wrong": wrong[:3]},
            {"input": x[3:], "target": target[3:], "wrong": wrong[3:]},
        ]
    else:
        batches = [x[:4], x[4:]]
    ref_means = means if method == "mean" else None
    want = naive_sweep(model, batches, units, ref_means, metric)
    got = sweep(model, batches, units, means, metric=metric, method=method, stack=stack)
    torch.testing.assert_close(got.per_example, want, atol=ATOL, rtol=1e-5)
    assert want.abs().max() > 1e-3


# -- errors ------------------------------------------------------------------------------
def test_sweep_rejects_bad_arguments() -> None:
    model = sequential(0)
    x = torch.randn(4, 5)
    means = random_means(model, ["1"], False, 1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no module"):
        sweep(model, [x], ["nope[neurons=1]"], means)
    with pytest.raises(ValueError, match="non-empty"):
        sweep(model, [x], [], means)
    with pytest.raises(ValueError, match="duplicates"):
        sweep(model, [x], ["1[neurons=0]", "1[neurons=0]"], means)
    with pytest.raises(ValueError, match="at least one batch"):
        sweep(model, [], ["1[neurons=0]"], means)
    with pytest.raises(ValueError, match="stack"):
        sweep(model, [x], ["1[neurons=0]"], means, stack=0)
    with pytest.raises(IndexError):
        sweep(model, [x], ["1[neurons=99]"], means)


# -- Ctrl-C safety -----------------------------------------------------------------------
def interrupting_metric(on_call: int):
    calls = {"n": 0}

    def metric(logits, batch, clean=None):
        calls["n"] += 1
        if calls["n"] == on_call:
            raise KeyboardInterrupt
        return logits.double().pow(2).mean(dim=tuple(range(1, logits.ndim)))

    return metric


def hooks_left(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
    ]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("call", ["sweep-fast", "sweep-hooks", "attribute", "acdc"])
def test_keyboard_interrupt_leaves_no_hooks_and_weights_unchanged(call) -> None:
    cfg = TransformerConfig(
        n_layers=2, d_model=8, n_heads=2, d_head=3, d_vocab=7, n_ctx=6, d_mlp=5, normalization="LN"
    )
    gen = torch.Generator().manual_seed(0)
    model = random_model(cfg, 0)
    units = all_units(cfg, 4, gen)
    means = random_means(model, units, True, 6, gen)
    batches = make_batches(cfg, 2, 3, 4, "left", False, True, gen)
    before = snapshot(model)
    grads_before = [p.requires_grad for p in model.parameters()]
    # attribute calls the metric once per batch: interrupt it on the 2nd (of 2) batches
    metric = interrupting_metric(2 if call == "attribute" else 3)
    with pytest.raises(KeyboardInterrupt):
        if call.startswith("sweep"):
            sweep(model, batches, units, means, metric=metric, fast=call == "sweep-fast")
        elif call == "attribute":
            attribute(model, batches, units, means, metric=metric)
        else:
            discover(model, batches, means, units=units, metric=metric, threshold=0.1)
    assert hooks_left(model) == []
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == grads_before
    assert all(p.grad is None for p in model.parameters())
    # and the model still works the same afterwards
    want = naive_sweep(model, batches[:1], units[:3], means, "kl")
    got = sweep(model, batches[:1], units[:3], means, metric="kl")
    torch.testing.assert_close(got.per_example, want, atol=ATOL, rtol=1e-5)


def test_keyboard_interrupt_on_generic_model() -> None:
    model = sequential(1)
    gen = torch.Generator().manual_seed(1)
    units = ["1[neurons=0]", "1[neurons=1]", "3", "1[neurons=2]"]
    means = random_means(model, units, False, 1, gen)
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        sweep(
            model, [torch.randn(4, 5, generator=gen)], units, means, metric=interrupting_metric(3)
        )
    assert hooks_left(model) == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _FakeClock:
    """A clock that only the fake sweep advances, so calibration sees chosen timings."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("cost", "n", "oom_at", "want"),
    [
        # time per stacked unit falls until 8 copies, then stays flat: stop at 8
        (lambda k: 1.0 + 0.0 * k if k >= 8 else 8.0 / k, 512, None, 8),
        # the device runs out of memory at 16 copies before the gain stops
        (lambda k: 1.0 / k, 512, 16, 8),
        # never more copies than units to sweep
        (lambda k: 1.0 / k, 5, None, 4),
        # a device that gains nothing from stacking keeps one copy
        (lambda k: float(k), 512, None, 1),
    ],
)
def test_stack_calibration_doubles_until_time_per_unit_stops_improving(
    monkeypatch, cost, n, oom_at, want
) -> None:
    import importlib

    # (the package re-exports the function sweep under the module's name)
    sweep_mod = importlib.import_module("meanablate.discovery.sweep")
    clock = _FakeClock()
    monkeypatch.setattr(sweep_mod, "time", clock)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    tried = []

    def run(k: int) -> None:
        tried.append(k)
        if oom_at is not None and k >= oom_at:
            raise torch.OutOfMemoryError("fake")
        clock.now += cost(k) * k  # a pass of k stacked units

    assert sweep_mod._calibrate(run, n) == want
    assert max(tried) <= max(n, 1) and max(tried) <= 256
