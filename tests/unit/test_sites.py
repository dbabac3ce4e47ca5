"""Sites: the string form round-trips, bad strings and bad units fail loudly and helpfully."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from meanablate import Site, ablate, compute_means, parse_site
from meanablate.hooks import hooked
from meanablate.organisms import HookedTransformer, TransformerConfig
from meanablate.sites import as_sites, check_units_in_range, resolve_module


def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=7, n_ctx=6, d_mlp=12
    )
    return HookedTransformer(cfg).eval()


def n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- round trip ----------------------------------------------------------------------
segment = st.one_of(
    st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True),
    st.integers(0, 40).map(str),
)
module_path = st.lists(segment, min_size=1, max_size=5).map(".".join)
units = st.lists(st.integers(0, 300), min_size=1, max_size=6)


@st.composite
def sites(draw: st.DrawFn) -> Site:
    kind = draw(st.sampled_from(["none", "neurons", "heads", "flat_heads"]))
    kwargs: dict = {}
    if kind == "neurons":
        kwargs["neurons"] = tuple(draw(units))
    elif kind == "heads":
        kwargs["heads"] = tuple(draw(units))
    elif kind == "flat_heads":
        kwargs["heads"] = tuple(draw(units))
        kwargs["n_heads"] = draw(st.integers(1, 64))
    if draw(st.booleans()):
        kwargs["positions"] = tuple(draw(units))
    io = draw(st.sampled_from(["output", "input"]))
    return Site(draw(module_path), io=io, **kwargs)


@given(sites())
@settings(max_examples=300, deadline=None)
def test_str_parse_round_trip(site: Site) -> None:
    text = str(site)
    again = parse_site(text)
    assert again == site
    assert str(again) == text
    assert again.key == site.key
    # the string names exactly what the fields hold, read with an independent regex
    m = re.fullmatch(r"([^@\[]+)(@input)?(?:\[(.*)\])?", text)
    assert m is not None
    assert m.group(1) == site.module
    assert (m.group(2) is not None) == (site.io == "input")
    fields = dict(p.split("=") for p in m.group(3).split(";")) if m.group(3) else {}
    assert fields.get("neurons") == (",".join(map(str, site.neurons)) if site.neurons else None)
    assert fields.get("heads") == (",".join(map(str, site.heads)) if site.heads else None)
    assert fields.get("pos") == (",".join(map(str, site.positions)) if site.positions else None)
    assert fields.get("n_heads") == (str(site.n_heads) if site.n_heads else None)


@given(module_path, units, st.booleans())
@settings(max_examples=200, deadline=None)
def test_parse_normalizes_unsorted_duplicate_units(module: str, idx: list[int], pos: bool) -> None:
    key = "pos" if pos else "neurons"
    text = f" {module}[{key}={','.join(map(str, idx))}] "
    site = parse_site(text)
    got = site.positions if pos else site.neurons
    assert got == tuple(sorted(set(idx)))
    assert parse_site(str(site)) == site


def test_documented_examples() -> None:
    s = parse_site("transformer.h.1.attn.c_proj@input[heads=3;n_heads=4]")
    assert (s.module, s.heads, s.n_heads, s.io) == ("transformer.h.1.attn.c_proj", (3,), 4, "input")
    assert s.key == "transformer.h.1.attn.c_proj@input"
    s = parse_site("blocks.0.mlp.hook_post[neurons=5;pos=3]")
    assert (s.neurons, s.positions, s.key) == ((5,), (3,), "blocks.0.mlp.hook_post")
    assert parse_site("blocks.0.hook_resid_pre[positions=4]").positions == (4,)
    assert parse_site("blocks.1.hook_mlp_out") == Site("blocks.1.hook_mlp_out")
    assert parse_site("m@output") == Site("m")
    assert parse_site(Site("m")) == Site("m")
    assert as_sites("m") == [Site("m")]
    assert as_sites(["a", Site("b", neurons=1)]) == [Site("a"), Site("b", neurons=(1,))]


# -- bad strings ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "[heads=1]",
        "a[heads=1",
        "a[heads=1]]",
        "a[foo=1]",
        "a[heads]",
        "a[heads=x]",
        "a[heads=1.5]",
        "a[heads=]",
        "a[neurons=1;heads=2]",
        "a[n_heads=4]",
        "a[heads=1;n_heads=0]",
        "a[heads=1;n_heads=]",
        "a[heads=1;n_heads=2,3]",
        "a[heads=1;heads=2]",
        "a[pos=1;positions=2]",
        "a@inputs",
        "a@input@input",
        "a[heads=1]@input",
    ],
)
def test_bad_strings_raise_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"site|module"):
        parse_site(text)


def test_non_string_site_is_type_error() -> None:
    with pytest.raises(TypeError, match="Site or a string"):
        parse_site(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="integer"):
        Site("m", neurons=(True,))
    with pytest.raises(TypeError, match="integer"):
        Site("m", heads=(1.0,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="io"):
        Site("m", io="inside")  # type: ignore[arg-type]


# -- unknown modules -----------------------------------------------------------------
def test_unknown_module_lists_closest_names() -> None:
    model = tiny_model()
    with pytest.raises(ValueError) as err:
        resolve_module(model, "blocks.0.attn.hook_zz")
    msg = str(err.value)
    assert "HookedTransformer" in msg and "'blocks.0.attn.hook_zz'" in msg
    assert "closest:" in msg and "blocks.0.attn.hook_z" in msg
    # the same message on every entry point, and nothing stays attached
    for call in (
        lambda: ablate(model, "blocks.0.mlp.hook_pots[neurons=1]", method="zero").__enter__(),
        lambda: compute_means(model, ["blocks.1.hook_resid_pr"], [torch.zeros(1, 3).long()]),
        lambda: hooked(
            model, {"blocks.0.mlp.hook_post": lambda a: None, "nope": lambda a: None}
        ).__enter__(),
    ):
        with pytest.raises(ValueError, match=r"closest|no module"):
            call()
        assert n_hooks(model) == 0


def test_module_reachable_by_attribute_path_resolves() -> None:
    # A module registered under two parents appears once in named_modules() (under the
    # first path); its other path must still resolve (TransformerLens bridges do this).
    shared = nn.Linear(2, 2)
    model = nn.Module()
    model.first = nn.Sequential(shared)
    model.alias = nn.Module()
    model.alias.proj = shared
    assert "alias.proj" not in dict(model.named_modules())
    assert resolve_module(model, "alias.proj") is shared
    assert resolve_module(model, "first.0") is shared


# -- units out of range ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("blocks.0.mlp.hook_post[neurons=-1]", "neurons"),
        ("blocks.0.attn.hook_z[heads=0,-2]", "heads"),
        ("blocks.0.hook_resid_pre[pos=-1]", "positions"),
    ],
)
def test_negative_units_index_error_names_site(text: str, field: str) -> None:
    with pytest.raises(IndexError) as err:
        parse_site(text)
    msg = str(err.value)
    assert text.split("[")[0] in msg and field in msg and "negative" in msg


@pytest.mark.parametrize(
    ("text", "shape_text", "what"),
    [
        ("blocks.0.mlp.hook_post[neurons=12]", "(2, 5, 12)", "neuron 12"),
        ("blocks.0.attn.hook_z[heads=1,2]", "2 heads here (0..1)", "head 2"),  # config
        ("blocks.0.hook_resid_pre[pos=5]", "(2, 5, 8)", "position 5"),
        ("blocks.1.hook_resid_pre@input[heads=4;n_heads=4]", "(2, 5, 8)", "head 4"),
    ],
)
def test_out_of_range_units_index_error_with_site_and_shape(
    text: str, shape_text: str, what: str
) -> None:
    model = tiny_model()
    tokens = torch.randint(0, 7, (2, 5))
    for method in ("zero", "mean"):
        means = compute_means(model, [text.split("[")[0]], [tokens]) if method == "mean" else None
        with pytest.raises(IndexError) as err, ablate(model, text, means, method=method):
            model(tokens)
        msg = str(err.value)
        assert str(parse_site(text)) in msg, msg
        assert shape_text in msg and what in msg, msg
        assert n_hooks(model) == 0


def test_check_units_in_range_direct() -> None:
    check_units_in_range(Site("m", neurons=(3,)), (2, 4))
    check_units_in_range(Site("m", heads=(1,), n_heads=2), (2, 3, 8))
    with pytest.raises(IndexError, match=r"neuron 4.*\(2, 4\)"):
        check_units_in_range(Site("m", neurons=(4,)), (2, 4))
    with pytest.raises(ValueError, match="not divisible"):
        check_units_in_range(Site("m", heads=(1,), n_heads=3), (2, 3, 8))
    with pytest.raises(ValueError, match="no head dim"):
        check_units_in_range(Site("m", heads=(0,)), (2, 8))
    with pytest.raises(ValueError, match="no position dim"):
        check_units_in_range(Site("m", positions=(0,)), (2, 8))


def test_site_field_validation() -> None:
    with pytest.raises(ValueError, match="heads or neurons"):
        Site("m", heads=(0,), neurons=(1,))
    with pytest.raises(ValueError, match="empty"):
        Site("m", neurons=())
    with pytest.raises(ValueError, match="module path"):
        Site("")
    assert Site("m", neurons=3).neurons == (3,)
    assert Site("m", positions=[2, 0, 2]).positions == (0, 2)
    assert Site("m", heads=(0,)).with_units(heads=(2,)).heads == (2,)
