"""Sweeps on list-of-blocks models skip the untouched layers and still equal a full run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import meanablate as ma
from meanablate.discovery import layerskip, sweep


class Blocks(nn.Module):
    """A plain sequence of residual MLP blocks, HF-style: each block returns a tuple."""

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
def test_skipping_equals_the_full_hooked_run(cls) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    batches = [torch.randn(6, 3, 8)]
    means = ma.compute_means(model, sorted({u.split("[")[0] for u in _units()}), batches)
    fast = sweep(model, batches, _units(), means, metric="l2")
    full = sweep(model, batches, _units(), means, metric="l2", fast=False)
    torch.testing.assert_close(fast.per_example, full.per_example, rtol=0, atol=1e-9)
    assert full.values.abs().min() > 0
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_skip_blocks_restores_forward_on_error() -> None:
    model = Blocks()
    found = layerskip.find_blocks(model)
    assert found is not None and found[0] == "layers"
    with layerskip.record_block_outputs(found[1]) as outs:
        model(torch.randn(2, 8))
    with pytest.raises(RuntimeError, match="boom"), layerskip.skip_blocks(found[1], 3, outs):
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert layerskip.block_of("layers.2.1", "layers", 4) == 2
    assert layerskip.block_of("head", "layers", 4) is None
