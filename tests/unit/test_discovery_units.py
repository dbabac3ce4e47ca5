"""Unit enumeration and ordering: transformer_units, unit_layer, unit_kind, reverse_topological.

The reference for "topological" is the order in which the model's modules actually run:
forward hooks on every module record when each one finishes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from meanablate.discovery import reverse_topological, transformer_units, unit_kind, unit_layer
from meanablate.organisms import HookedTransformer, TransformerConfig

CFG = TransformerConfig(n_layers=3, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=4, d_mlp=6)
MODEL = HookedTransformer(CFG).eval()


def execution_order(model: nn.Module) -> dict[str, int]:
    """Module path -> the step at which its forward finished (first time)."""
    order: dict[str, int] = {}

    def record(name: str):
        def hook(_m, _a, _o) -> None:
            order.setdefault(name, len(order))

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return order


ORDER = execution_order(MODEL)


def module_of(unit: str) -> str:
    return unit.split("[")[0]


def every_unit() -> list[str]:
    units = []
    for layer in range(CFG.n_layers):
        units += [
            f"blocks.{layer}.hook_resid_pre",
            f"blocks.{layer}.hook_resid_pre[pos=1]",
            f"blocks.{layer}.attn.hook_z",
            f"blocks.{layer}.attn.hook_z[heads=1]",
            f"blocks.{layer}.attn.hook_z[heads=0;pos=2]",
            f"blocks.{layer}.hook_attn_out",
            f"blocks.{layer}.hook_attn_out[pos=0]",
            f"blocks.{layer}.hook_resid_mid[pos=1]",
            f"blocks.{layer}.mlp.hook_post",
            f"blocks.{layer}.mlp.hook_post[neurons=3]",
            f"blocks.{layer}.mlp.hook_post[neurons=3;pos=0]",
            f"blocks.{layer}.hook_mlp_out",
            f"blocks.{layer}.hook_mlp_out[pos=2]",
            f"blocks.{layer}.hook_resid_post",
            f"blocks.{layer}.hook_resid_post[pos=0]",
        ]
    return units


@settings(max_examples=40, deadline=None)
@given(st.permutations(every_unit()), st.integers(1, 45))
def test_reverse_topological_follows_the_forward_pass_backwards(units, n) -> None:
    units = units[:n]
    got = reverse_topological(units)
    assert sorted(got) == sorted(units)
    steps = [ORDER[module_of(u)] for u in got]
    assert steps == sorted(steps, reverse=True), list(zip(got, steps))


def test_reverse_topological_on_the_usual_components() -> None:
    units = transformer_units(MODEL, "components")
    got = reverse_topological(units)
    assert got[0] == "blocks.2.hook_mlp_out"
    assert set(got[-2:]) == {"blocks.0.attn.hook_z[heads=0]", "blocks.0.attn.hook_z[heads=1]"}
    steps = [ORDER[module_of(u)] for u in got]
    assert steps == sorted(steps, reverse=True)


def test_transformer_units_enumerates_every_granularity() -> None:
    heads = transformer_units(MODEL, "heads")
    assert heads == [f"blocks.{L}.attn.hook_z[heads={h}]" for L in range(3) for h in range(2)]
    assert transformer_units(MODEL, "mlps") == [f"blocks.{L}.hook_mlp_out" for L in range(3)]
    comps = transformer_units(MODEL, "components", layers=[1])
    assert comps == [
        "blocks.1.attn.hook_z[heads=0]",
        "blocks.1.attn.hook_z[heads=1]",
        "blocks.1.hook_mlp_out",
    ]
    neurons = transformer_units(MODEL, "neurons", layers=[0])
    assert neurons == [f"blocks.0.mlp.hook_post[neurons={i}]" for i in range(6)]
    assert transformer_units(MODEL, "layers", layers=[2]) == [
        "blocks.2.hook_attn_out",
        "blocks.2.hook_mlp_out",
    ]
    pos = transformer_units(MODEL, "positions", n_positions=2, layers=[0])
    assert pos == ["blocks.0.hook_resid_pre[pos=0]", "blocks.0.hook_resid_pre[pos=1]"]
    for u in heads + neurons + pos:
        MODEL.get_submodule(module_of(u))  # every unit names a real module


def test_transformer_units_errors() -> None:
    attn_only = HookedTransformer(
        TransformerConfig(n_layers=1, d_model=4, n_heads=1, d_head=4, d_vocab=3, n_ctx=2)
    )
    assert transformer_units(attn_only, "components") == ["blocks.0.attn.hook_z[heads=0]"]
    with pytest.raises(ValueError, match="no MLPs"):
        transformer_units(attn_only, "neurons")
    with pytest.raises(ValueError, match="n_positions"):
        transformer_units(MODEL, "positions")
    with pytest.raises(ValueError, match="granularity"):
        transformer_units(MODEL, "wires")  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        transformer_units(MODEL, "heads", layers=[3])
    with pytest.raises(TypeError, match="no known model family"):
        transformer_units(nn.Linear(2, 2))


def test_unit_layer_and_kind() -> None:
    assert unit_layer("blocks.12.attn.hook_z[heads=0]") == 12
    assert unit_layer("transformer.h.3.mlp.c_fc") == 3
    assert unit_layer("0[neurons=1]") == -1
    assert unit_kind("blocks.0.attn.hook_z[heads=0]") == "head"
    assert unit_kind("blocks.0.mlp.hook_post[neurons=1]") == "neuron"
    assert unit_kind("blocks.0.hook_resid_pre[pos=1]") == "position"
    assert unit_kind("blocks.0.hook_mlp_out") == "mlp"
    assert unit_kind("blocks.0.hook_attn_out") == "attn"
    assert unit_kind("blocks.0.hook_resid_post") == "resid"
