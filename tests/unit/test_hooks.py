"""Hooks and ablate(): nothing stays attached, weights never change, and every ablation
equals a hand-written torch hook doing the same replacement."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from meanablate import Means, ablate, capture, run_model
from meanablate.hooks import hooked, output_tensor
from meanablate.organisms import HookedTransformer, TransformerConfig

CFG = TransformerConfig(
    n_layers=2,
    d_model=16,
    n_heads=4,
    d_head=4,
    d_vocab=11,
    n_ctx=8,
    d_mlp=24,
    normalization="LN",
)


def make_model(seed: int = 0) -> HookedTransformer:
    torch.manual_seed(seed)
    model = HookedTransformer(CFG).eval()
    with torch.no_grad():  # larger weights than the default init: effects are visible
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


MODEL = make_model()
TOKENS = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))
OTHER = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(2))


def hook_state(model: nn.Module) -> list[tuple[str, int, int, int]]:
    return [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
    ]


def state_bytes(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().clone().numpy().tobytes() for k, v in model.state_dict().items()}


def fake_means(model: nn.Module, keys: list[str], tokens: torch.Tensor) -> Means:
    """Means made by hand (not by compute_means): ``[...]`` values spread over [-1.5, 2]."""
    tensors = {}
    for i, key in enumerate(sorted(keys)):
        shape = record(model, key.removesuffix("@input"), tokens, key.endswith("@input")).shape
        n = int(torch.tensor(shape[2:]).prod())
        tensors[key] = torch.linspace(-1.5, 2.0 + i, n, dtype=torch.float64).reshape(shape[2:])
    return Means(tensors, {k: torch.tensor(10.0, dtype=torch.float64) for k in tensors})


SITE_SETS = [
    ["blocks.0.attn.hook_z[heads=1]"],
    ["blocks.1.mlp.hook_post[neurons=3,7]", "blocks.0.hook_resid_pre[pos=2]"],
    ["blocks.1.hook_attn_in@input[pos=0,3]", "blocks.0.attn.hook_z[heads=0,3;pos=1]"],
]


# -- cleanup -----------------------------------------------------------------------------
@pytest.mark.parametrize("sites", SITE_SETS)
@pytest.mark.parametrize("method", ["mean", "zero", "resample"])
def test_no_leftover_hooks_and_same_weights_on_normal_exit(sites: list[str], method: str) -> None:
    model = make_model()
    before = state_bytes(model)
    keys = sorted({s.split("[")[0] for s in sites})
    means = fake_means(model, keys, TOKENS)
    clean = model(TOKENS).detach()
    with ablate(model, sites, means, method=method, source=OTHER) as m:
        assert m is model
        assert hook_state(model)  # hooks are attached inside
        ablated = model(TOKENS)
        ablated.sum().backward()  # gradients flow through an ablated forward
    assert hook_state(model) == []
    assert not torch.equal(ablated, clean)
    model.zero_grad(set_to_none=True)
    assert state_bytes(model) == before
    assert torch.equal(model(TOKENS), clean)


@pytest.mark.parametrize("sites", SITE_SETS)
@pytest.mark.parametrize("method", ["mean", "zero", "resample"])
@pytest.mark.parametrize("where", ["block", "forward"])
def test_no_leftover_hooks_and_same_weights_on_exception(
    sites: list[str], method: str, where: str
) -> None:
    model = make_model()
    before = state_bytes(model)
    keys = sorted({s.split("[")[0] for s in sites})
    means = fake_means(model, keys, TOKENS)
    clean = model(TOKENS).detach()

    class BoomError(Exception):
        pass

    def explode(_m: nn.Module, _a: tuple, _o: torch.Tensor) -> None:
        raise BoomError

    with pytest.raises(BoomError), ablate(model, sites, means, method=method, source=OTHER):
        if where == "block":
            model(TOKENS)
            raise BoomError
        # an exception inside the forward pass, after our hooks ran on earlier modules
        handle = model.blocks[1].hook_resid_post.register_forward_hook(explode)
        try:
            model(TOKENS)
        finally:
            handle.remove()
    assert hook_state(model) == []
    assert state_bytes(model) == before
    assert torch.equal(model(TOKENS), clean)


def test_keyboard_interrupt_and_capture_cleanup() -> None:
    model = make_model()
    with pytest.raises(KeyboardInterrupt), ablate(model, "blocks.0.mlp.hook_post", method="zero"):
        raise KeyboardInterrupt
    assert hook_state(model) == []
    with pytest.raises(RuntimeError), capture(model, ["blocks.0.attn.hook_z"]) as store:
        model(TOKENS)
        assert store["blocks.0.attn.hook_z"].shape == (3, 6, 4, 4)
        raise RuntimeError
    assert hook_state(model) == []
    # a bad key after a good one: the good one's hook is removed too
    with pytest.raises(ValueError), hooked(model, {"blocks.0.mlp.hook_post": lambda a: a, "x": id}):
        pass
    assert hook_state(model) == []
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_validation_errors_leave_no_hooks() -> None:
    model = make_model()
    means = fake_means(model, ["blocks.0.mlp.hook_post"], TOKENS)
    bad = [
        dict(ablations="blocks.0.mlp.hook_post", method="nope"),
        dict(ablations="blocks.0.mlp.hook_post", method="mean"),
        dict(ablations="blocks.0.mlp.hook_post", method="resample"),
        dict(ablations="blocks.1.mlp.hook_post", means=means),
        dict(
            ablations=[
                "blocks.0.hook_attn_in@input[heads=0;n_heads=2]",
                "blocks.0.hook_attn_in@input[heads=0;n_heads=4]",
            ],
            method="zero",
        ),
    ]
    for kwargs in bad:
        with pytest.raises((ValueError, KeyError)), ablate(model, **kwargs):
            pass
        assert hook_state(model) == []


# -- heads are independent -----------------------------------------------------------------
@given(
    heads=st.sets(st.integers(0, 3), min_size=1, max_size=3),
    layer=st.integers(0, 1),
    method=st.sampled_from(["mean", "zero", "resample"]),
)
@settings(max_examples=30, deadline=None)
def test_ablating_heads_never_changes_other_heads(heads: set[int], layer: int, method: str) -> None:
    model = MODEL
    key = f"blocks.{layer}.attn.hook_z"
    means = fake_means(model, [key], TOKENS)
    seen: dict[str, torch.Tensor] = {}

    def grab(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
        seen["z"] = out.detach().clone()

    mod = model.get_submodule(key)
    with torch.no_grad():
        h = mod.register_forward_hook(grab)
        model(TOKENS)
        clean_z = seen["z"]
        model(OTHER)
        other_z = seen["z"]
        h.remove()
        site = f"{key}[heads={','.join(map(str, sorted(heads)))}]"
        with ablate(model, site, means, method=method, source=OTHER):
            h = mod.register_forward_hook(grab)  # runs after ablate's hook: sees the result
            model(TOKENS)
            h.remove()
    z = seen["z"]
    others = [i for i in range(4) if i not in heads]
    # bit for bit: the other heads are the clean run's values
    assert torch.equal(z[:, :, others], clean_z[:, :, others])
    want = {
        "mean": means[key].float().expand_as(z),
        "zero": torch.zeros_like(z),
        "resample": other_z,
    }[method]
    assert torch.equal(z[:, :, sorted(heads)], want[:, :, sorted(heads)])


class FlatHeads(nn.Module):
    """``proj``'s input is ``[batch, pos, n_heads * d_head]`` like GPT-2's ``attn.c_proj``."""

    def __init__(self, d: int = 24) -> None:
        super().__init__()
        self.mix = nn.Linear(d, d)
        self.proj = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.mix(x)))


@given(
    n_heads=st.sampled_from([1, 2, 3, 4, 6, 8]),
    data=st.data(),
)
@settings(max_examples=40, deadline=None)
def test_flat_heads_touch_only_their_slice(n_heads: int, data: st.DataObject) -> None:
    torch.manual_seed(0)
    model = FlatHeads().eval()
    x = torch.randn(2, 3, 24)
    heads = data.draw(st.sets(st.integers(0, n_heads - 1), min_size=1))
    d_head = 24 // n_heads
    seen = {}

    def grab(_m: nn.Module, args: tuple) -> None:
        seen["in"] = args[0].detach().clone()

    with torch.no_grad():
        h = model.proj.register_forward_pre_hook(grab)
        model(x)
        clean = seen["in"]
        site = f"proj@input[heads={','.join(map(str, heads))};n_heads={n_heads}]"
        with ablate(model, site, method="zero"):
            h.remove()
            h = model.proj.register_forward_pre_hook(grab)
            out = model(x)
        h.remove()
    cols = torch.zeros(24, dtype=torch.bool)
    for i in heads:
        cols[i * d_head : (i + 1) * d_head] = True
    assert torch.equal(seen["in"][..., ~cols], clean[..., ~cols])
    assert torch.all(seen["in"][..., cols] == 0)
    ref = clean.clone()
    ref[..., cols] = 0
    assert torch.equal(out, model.proj(ref))


# -- equal to hand-written hooks ----------------------------------------------------------
def run_with_hand_hook(model: nn.Module, path: str, fn, *, pre: bool = False) -> torch.Tensor:
    mod = model.get_submodule(path)
    if pre:
        h = mod.register_forward_pre_hook(lambda m, a: (fn(a[0].clone()), *a[1:]))
    else:
        h = mod.register_forward_hook(lambda m, a, o: fn(o.clone()))
    try:
        with torch.no_grad():
            return model(TOKENS)
    finally:
        h.remove()


def record(model: nn.Module, path: str, tokens: torch.Tensor, pre: bool = False) -> torch.Tensor:
    store = {}
    mod = model.get_submodule(path)
    if pre:
        h = mod.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0].clone()))
    else:
        h = mod.register_forward_hook(lambda m, a, o: store.__setitem__("x", o.clone()))
    with torch.no_grad():
        model(tokens)
    h.remove()
    return store["x"]


def _heads_at_positions(out: torch.Tensor, fill: torch.Tensor) -> None:
    for b in range(out.shape[0]):
        for p in (1, 4):
            for h in (0, 3):
                out[b, p, h] = fill[b, p, h]


def _index(*idx: object):
    def put(out: torch.Tensor, fill: torch.Tensor) -> None:
        out[idx] = fill[idx]

    return put


ALL = slice(None)
# (site, module path, is its input, in-place hand replacement given a full-shape fill)
CASES = [
    ("blocks.0.attn.hook_z[heads=2]", "blocks.0.attn.hook_z", False, _index(ALL, ALL, 2)),
    ("blocks.1.attn.hook_z[heads=0,3;pos=1,4]", "blocks.1.attn.hook_z", False, _heads_at_positions),
    (
        "blocks.0.mlp.hook_post[neurons=1,5,23]",
        "blocks.0.mlp.hook_post",
        False,
        _index(..., [1, 5, 23]),
    ),
    ("blocks.1.mlp.hook_pre[neurons=2;pos=0]", "blocks.1.mlp.hook_pre", False, _index(ALL, 0, 2)),
    ("blocks.1.hook_resid_pre[pos=3]", "blocks.1.hook_resid_pre", False, _index(ALL, 3)),
    (
        "blocks.1.hook_mlp_in@input[neurons=0,15]",
        "blocks.1.hook_mlp_in",
        True,
        _index(..., [0, 15]),
    ),
    ("blocks.0.hook_attn_out", "blocks.0.hook_attn_out", False, _index(...)),
]


def hand_replace(act: torch.Tensor, put, fill: torch.Tensor) -> torch.Tensor:
    out = act.clone()
    put(out, fill)
    return out


@pytest.mark.parametrize(("site", "path", "pre", "how"), CASES)
@pytest.mark.parametrize("method", ["zero", "resample", "mean", "mean_per_position"])
def test_ablation_equals_hand_written_hook(
    site: str, path: str, pre: bool, how, method: str
) -> None:
    model = MODEL
    key = path + ("@input" if pre else "")
    act_shape = record(model, path, TOKENS, pre).shape
    if method == "zero":
        fill = torch.zeros(act_shape)
        kwargs: dict = {"method": "zero"}
    elif method == "resample":
        fill = record(model, path, OTHER, pre)
        kwargs = {"method": "resample", "source": OTHER}
    else:
        per_pos = method == "mean_per_position"
        g = torch.Generator().manual_seed(3)
        mean_shape = act_shape[1:] if per_pos else act_shape[2:]
        if per_pos:  # per-position means longer than the input are cut to it
            mean_shape = (act_shape[1] + 2, *act_shape[2:])
        mean = torch.randn(mean_shape, generator=g, dtype=torch.float64)
        means = Means({key: mean}, {key: torch.tensor(1.0)}, per_position=per_pos)
        fill = (mean[: act_shape[1]] if per_pos else mean).float().expand(act_shape)
        kwargs = {"means": means, "method": "mean"}
    want = run_with_hand_hook(model, path, lambda a: hand_replace(a, how, fill), pre=pre)
    with torch.no_grad(), ablate(model, site, **kwargs):
        got = model(TOKENS)
    assert torch.equal(got, want)
    assert hook_state(model) == []


def test_two_sites_on_one_activation_ablate_the_union() -> None:
    model = MODEL
    path = "blocks.1.mlp.hook_post"
    fill = record(model, path, OTHER)

    def hand(a: torch.Tensor) -> torch.Tensor:
        a[:, :, 4] = fill[:, :, 4]
        a[:, 2, :] = fill[:, 2, :]
        return a

    want = run_with_hand_hook(model, path, hand)
    with (
        torch.no_grad(),
        ablate(model, [f"{path}[neurons=4]", f"{path}[pos=2]"], method="resample", source=OTHER),
    ):
        got = model(TOKENS)
    assert torch.equal(got, want)


def test_nested_ablations_compose_like_hand_hooks() -> None:
    model = MODEL
    p1, p2 = "blocks.0.mlp.hook_post", "blocks.1.attn.hook_z"

    def h1(m, a, o):
        o = o.clone()
        o[..., 3] = 0
        return o

    def h2(m, a, o):
        o = o.clone()
        o[:, :, 1] = 0
        return o

    handles = [
        model.get_submodule(p1).register_forward_hook(h1),
        model.get_submodule(p2).register_forward_hook(h2),
    ]
    with torch.no_grad():
        want = model(TOKENS)
    for h in handles:
        h.remove()
    with (
        torch.no_grad(),
        ablate(model, f"{p1}[neurons=3]", method="zero"),
        ablate(model, f"{p2}[heads=1]", method="zero"),
    ):
        got = model(TOKENS)
    assert torch.equal(got, want)
    assert hook_state(model) == []


def test_ablation_does_not_modify_the_activation_in_place() -> None:
    model = MODEL
    refs = {}
    mod = model.get_submodule("blocks.0.mlp.hook_post")
    with torch.no_grad():
        h = mod.register_forward_hook(lambda m, a, o: refs.__setitem__("o", o))  # no clone
        model(TOKENS)
        clean = refs["o"].clone()
        with ablate(model, "blocks.0.mlp.hook_post[neurons=0,1,2]", method="zero"):
            model(TOKENS)
        h.remove()
    assert torch.equal(refs["o"], clean)


def test_sequential_mlp_2d_activation_equals_hand_hook() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    x = torch.randn(9, 5)
    mean = torch.randn(7, dtype=torch.float64)
    means = Means({"1": mean}, {"1": torch.tensor(9.0)})

    def hand(m, a, o):
        o = o.clone()
        o[:, [0, 4]] = mean[[0, 4]].float()
        return o

    h = model[1].register_forward_hook(hand)
    with torch.no_grad():
        want = model(x)
    h.remove()
    for grad in (False, True):  # the no-grad path and the autograd path
        with torch.set_grad_enabled(grad), ablate(model, "1[neurons=0,4]", means):
            got = model(x)
        assert torch.equal(got.detach(), want)


# -- run_model / output_tensor ---------------------------------------------------------------
class TakesInputIds(nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return input_ids.float() * (1 if attention_mask is None else attention_mask)


class TakesTokens(nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.float() + 1


class TakesInput(nn.Module):
    def forward(self, input: torch.Tensor, **kwargs) -> torch.Tensor:
        return input.float() - 1


def test_run_model_routes_token_names_and_drops_task_fields() -> None:
    ids = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[1, 1, 0]])
    task = {"target": ids, "wrong": ids, "labels": ids, "target_pos": ids}
    assert torch.equal(run_model(TakesInputIds(), {"tokens": ids, **task}), ids.float())
    assert torch.equal(
        run_model(TakesInputIds(), {"input_ids": ids, "attention_mask": mask}), ids.float() * mask
    )
    assert torch.equal(run_model(TakesTokens(), {"input_ids": ids, **task}), ids.float() + 1)
    assert torch.equal(run_model(TakesTokens(), ids), ids.float() + 1)
    # TransformerLens-style forward(input, **kwargs)
    assert torch.equal(run_model(TakesInput(), {"input_ids": ids, **task}), ids.float() - 1)
    assert torch.equal(run_model(TakesInput(), {"tokens": ids}), ids.float() - 1)
    with pytest.raises(ValueError, match="none of the batch's keys"):
        run_model(TakesTokens(), {"pixels": ids})
    with pytest.raises(TypeError, match="a batch is"):
        run_model(TakesTokens(), [ids])


def test_output_tensor() -> None:
    t = torch.ones(2)

    class Out:
        logits = t

    assert output_tensor(t) is t
    assert output_tensor(Out()) is t
    assert output_tensor((t, None)) is t
    with pytest.raises(TypeError):
        output_tensor({"x": 1})
