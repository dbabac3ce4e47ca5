"""ablation_effect / run_ablated against hand-written hooks and hand metrics; bootstrap_ci."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from meanablate import Effect, Means, ablation_effect, bootstrap_ci, run_ablated
from meanablate.organisms import HookedTransformer, TransformerConfig

CFG = TransformerConfig(n_layers=2, d_model=16, n_heads=4, d_head=4, d_vocab=11, n_ctx=8, d_mlp=24)


def make_model() -> HookedTransformer:
    torch.manual_seed(0)
    model = HookedTransformer(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


MODEL = make_model()
G = torch.Generator().manual_seed(5)
TOKENS = torch.randint(0, 11, (6, 7), generator=G)
TARGET = torch.randint(0, 11, (6, 7), generator=G)
TARGET[:, :3] = -100
BATCH = {"tokens": TOKENS, "target": TARGET}
MEAN = torch.randn(4, 4, dtype=torch.float64, generator=G)
MEANS = Means({"blocks.1.attn.hook_z": MEAN}, {"blocks.1.attn.hook_z": torch.tensor(1.0)})


def hand_ablated_logits() -> torch.Tensor:
    def hook(_m: nn.Module, _a: tuple, z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        z[:, :, 2] = MEAN[2].float()
        return z

    h = MODEL.blocks[1].attn.hook_z.register_forward_hook(hook)
    with torch.no_grad():
        out = MODEL(TOKENS)
    h.remove()
    return out


def hand_loss(logits: torch.Tensor) -> list[float]:
    out = []
    for b in range(logits.shape[0]):
        terms = []
        for p in range(logits.shape[1]):
            t = int(TARGET[b, p])
            if t == -100:
                continue
            row = logits[b, p].double().tolist()
            lse = max(row) + math.log(math.fsum(math.exp(v - max(row)) for v in row))
            terms.append(lse - row[t])
        out.append(math.fsum(terms) / len(terms))
    return out


def test_run_ablated_equals_hand_hook() -> None:
    got = run_ablated(MODEL, BATCH, "blocks.1.attn.hook_z[heads=2]", MEANS)
    assert torch.equal(got, hand_ablated_logits())


def test_effect_on_l2_equals_hand_computation() -> None:
    with torch.no_grad():
        clean = MODEL(TOKENS)
    ablated = hand_ablated_logits()
    # l2 reads the scored positions (target != -100)
    want = [
        math.sqrt(
            math.fsum(
                (float(a) - float(c)) ** 2
                for p in range(TOKENS.shape[1])
                if TARGET[b, p] != -100
                for a, c in zip(ablated[b, p], clean[b, p])
            )
        )
        for b in range(TOKENS.shape[0])
    ]
    eff = ablation_effect(MODEL, BATCH, "blocks.1.attn.hook_z[heads=2]", MEANS, metric="l2")
    assert isinstance(eff, Effect) and eff.metric == "l2"
    np.testing.assert_allclose(eff.per_example.numpy(), want, rtol=1e-6)
    assert eff.value == pytest.approx(float(np.mean(want)), rel=1e-6)
    assert eff.clean == 0.0
    assert eff.ablated == pytest.approx(eff.value, rel=1e-12)
    assert eff.ci[0] <= eff.value <= eff.ci[1]


def test_effect_on_loss_equals_hand_computation() -> None:
    with torch.no_grad():
        clean = MODEL(TOKENS)
    ablated = hand_ablated_logits()
    lc, la = hand_loss(clean), hand_loss(ablated)
    eff = ablation_effect(MODEL, BATCH, "blocks.1.attn.hook_z[heads=2]", MEANS, metric="loss")
    np.testing.assert_allclose(eff.per_example.numpy(), np.subtract(la, lc), rtol=1e-9, atol=1e-9)
    assert eff.clean == pytest.approx(np.mean(lc), rel=1e-9)
    assert eff.ablated == pytest.approx(np.mean(la), rel=1e-9)
    again = ablation_effect(
        MODEL, BATCH, "blocks.1.attn.hook_z[heads=2]", MEANS, metric="loss", seed=0
    )
    assert again.ci == eff.ci
    assert all(not m._forward_hooks for m in MODEL.modules())


def test_effect_with_zero_and_resample() -> None:
    other = torch.randint(0, 11, TOKENS.shape, generator=torch.Generator().manual_seed(9))
    store = {}

    def grab(_m, _a, z):
        store["z"] = z.detach().clone()

    h = MODEL.blocks[0].mlp.hook_post.register_forward_hook(grab)
    with torch.no_grad():
        MODEL(other)
    h.remove()
    for method, fill in (("zero", torch.zeros_like(store["z"])), ("resample", store["z"])):

        def hook(_m, _a, z, fill=fill):
            z = z.clone()
            z[..., [1, 6]] = fill[..., [1, 6]]
            return z

        h = MODEL.blocks[0].mlp.hook_post.register_forward_hook(hook)
        with torch.no_grad():
            want = MODEL(TOKENS)
        h.remove()
        got = run_ablated(
            MODEL, BATCH, "blocks.0.mlp.hook_post[neurons=1,6]", method=method, source=other
        )
        assert torch.equal(got, want)
        if method == "resample":  # activations captured beforehand: the same hook's result
            from meanablate.intervene import CapturedSource

            pre = CapturedSource({"blocks.0.mlp.hook_post": store["z"]})
            unit = "blocks.0.mlp.hook_post[neurons=1,6]"
            got = run_ablated(MODEL, BATCH, unit, method=method, source=pre)
            assert torch.equal(got, want)


def test_captured_resample_source_missing_or_misshapen_is_an_error() -> None:
    from meanablate.intervene import CapturedSource

    unit = "blocks.0.mlp.hook_post[neurons=1]"
    with pytest.raises(ValueError, match=r"no captured source activation for blocks\.0\.mlp"):
        run_ablated(MODEL, TOKENS, unit, method="resample", source=CapturedSource({}))
    short = CapturedSource({"blocks.0.mlp.hook_post": torch.zeros(1, 2, 3)})
    with pytest.raises(ValueError, match=r"resample source activation has shape \(1, 2, 3\)"):
        run_ablated(MODEL, TOKENS, unit, method="resample", source=short)
    assert all(not m._forward_hooks for m in MODEL.modules())


def test_resample_source_of_another_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match="resample source activation has shape"):
        run_ablated(
            MODEL, TOKENS, "blocks.0.mlp.hook_post[neurons=1]", method="resample", source=TOKENS[:2]
        )


# -- bootstrap ---------------------------------------------------------------------------
values = st.lists(
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), min_size=2, max_size=50
)


@given(values, st.integers(0, 2**31 - 1), st.sampled_from([0.9, 0.95, 0.99]))
@settings(max_examples=100, deadline=None)
def test_bootstrap_covers_the_mean_and_is_deterministic(
    xs: list[float], seed: int, level: float
) -> None:
    lo, hi = bootstrap_ci(np.array(xs), n_boot=300, level=level, seed=seed)
    mean = math.fsum(xs) / len(xs)
    assert min(xs) - 1e-9 <= lo <= hi <= max(xs) + 1e-9
    assert bootstrap_ci(
        torch.tensor(xs, dtype=torch.float64), n_boot=300, level=level, seed=seed
    ) == (lo, hi)
    # resampled means straddle the sample mean unless the data hardly vary
    spread = max(xs) - min(xs)
    assert lo <= mean + 1e-9 * max(1.0, abs(mean)) or spread < 1e-9
    assert hi >= mean - 1e-9 * max(1.0, abs(mean)) or spread < 1e-9


def test_bootstrap_reference_values() -> None:
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    rng = np.random.default_rng(123)
    x = rng.normal(2.0, 1.0, size=400)
    lo, hi = bootstrap_ci(x, n_boot=4000, seed=1)
    # normal-theory interval: mean +- 1.96 * sd / sqrt(n)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - half, abs=0.2 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.2 * half)
    lo90, hi90 = bootstrap_ci(x, n_boot=4000, level=0.9, seed=1)
    assert lo < lo90 < hi90 < hi
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(x, seed=7)
    assert bootstrap_ci(x, seed=7) != bootstrap_ci(x, seed=8)


@pytest.mark.parametrize(
    ("xs", "kwargs", "match"),
    [
        ([1.0], {}, "at least 2 examples"),
        ([], {}, "at least 2 examples"),
        ([[1.0, 2.0], [3.0, 4.0]], {}, "at least 2 examples"),
        ([1.0, 2.0], {"level": 1.0}, "level"),
        ([1.0, 2.0], {"level": 0.0}, "level"),
    ],
)
def test_bootstrap_bad_inputs(xs, kwargs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(np.array(xs), **kwargs)


def test_effect_on_one_example_cannot_have_a_ci() -> None:
    with pytest.raises(ValueError, match="at least 2 examples"):
        ablation_effect(MODEL, {"tokens": TOKENS[:1]}, "blocks.0.mlp.hook_post", method="zero")


# -- means must fit their site exactly: no broadcasting -------------------------------------
@pytest.mark.parametrize(
    "shape,per_position",
    [
        ((4,), False),  # [d_head] for [head, d_head]: one mean for every head
        ((1, 4), False),  # [1, d_head]
        ((4, 1), False),
        ((7, 4), True),  # per position, without the head axis
        ((7, 1, 4), True),
        ((16,), False),  # [head * d_head] flat
    ],
)
def test_mean_of_another_shape_is_an_error_naming_site_and_shapes(shape, per_position) -> None:
    key = "blocks.1.attn.hook_z"
    means = Means({key: torch.zeros(shape, dtype=torch.float64)}, {}, per_position)
    with pytest.raises(ValueError) as err:
        run_ablated(MODEL, BATCH, f"{key}[heads=2]", means)
    msg = str(err.value)
    assert key in msg and str(shape) in msg and "4, 4)" in msg, msg
    assert "(6, 7, 4, 4)" in msg  # the activation's shape
    assert len(MODEL.blocks[1].attn.hook_z._forward_hooks) == 0


def test_fitting_means_still_work_per_position_and_flat() -> None:
    key = "blocks.1.attn.hook_z"
    for means in (
        Means({key: MEAN}, {}, False),
        Means({key: MEAN.expand(8, 4, 4).clone()}, {}, True),  # longer than the input: cut
    ):
        got = run_ablated(MODEL, BATCH, f"{key}[heads=2]", means)
        assert torch.equal(got, hand_ablated_logits())
