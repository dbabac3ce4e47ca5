"""Sweeps resume from the unit's block through recorded block calls, never by patching."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import meanablate as ma
from meanablate.discovery import layerskip, sweep
from meanablate.families import family_of
from meanablate.organisms.transformer import HookedTransformer, TransformerConfig


class Blocks(nn.Module):
    """A plain sequence of residual MLP blocks (a model of no known family)."""

    def __init__(self, n: int = 4, d: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(n)
        )
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = x + block(x)
        return self.head(x)


class Shared(Blocks):
    """Not a plain sequence: block 0 runs twice, so cached outputs would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layers[0](x)
        for block in self.layers:
            x = x + block(x)
        return self.head(x)


def _units(n: int = 4) -> list[str]:
    return [f"layers.{L}.1[neurons={i}]" for L in range(n) for i in (0, 3, 7)]


@pytest.mark.parametrize("cls", [Blocks, Shared])
def test_generic_models_equal_the_full_hooked_run(cls) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    assert family_of(model).name == "generic" and not family_of(model).can_resume()
    batches = [torch.randn(6, 3, 8)]
    means = ma.compute_means(model, sorted({u.split("[")[0] for u in _units()}), batches)
    fast = sweep(model, batches, _units(), means, metric="l2")
    full = sweep(model, batches, _units(), means, metric="l2", fast=False)
    torch.testing.assert_close(fast.per_example, full.per_example, rtol=0, atol=1e-9)
    assert full.values.abs().min() > 0
    assert not any("forward" in m.__dict__ for m in model.modules())


def _ours() -> HookedTransformer:
    torch.manual_seed(1)
    cfg = TransformerConfig(
        n_layers=3, d_model=16, n_heads=2, d_head=8, d_vocab=11, n_ctx=6, d_mlp=20
    )
    return HookedTransformer(cfg).eval()


def test_run_from_equals_the_full_forward_and_leaves_no_hooks() -> None:
    model = _ours()
    family = family_of(model)
    tokens = torch.randint(0, 11, (3, 6))
    with torch.no_grad():
        with layerskip.record_block_calls(family) as calls:
            want = model(tokens)
        assert calls is not None
        for layer in range(3):
            assert calls.resumable_from(layer)
            torch.testing.assert_close(layerskip.run_from(family, calls, layer), want)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_record_block_calls_removes_hooks_on_error() -> None:
    model = _ours()
    with pytest.raises(RuntimeError, match="boom"), layerskip.record_block_calls(family_of(model)):
        raise RuntimeError("boom")
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert layerskip.block_of("layers.2.1", "layers", 4) == 2
    assert layerskip.block_of("head", "layers", 4) is None


def test_a_block_called_twice_is_not_resumed() -> None:
    model = _ours()
    family = family_of(model)
    tokens = torch.randint(0, 11, (2, 6))
    with torch.no_grad(), layerskip.record_block_calls(family) as calls:
        model(tokens)
        model.blocks[1](model.embed(tokens))
    assert calls is not None
    assert calls.resumable_from(2) and not calls.resumable_from(1)
