"""Edges on a Hugging Face GPT-2: the exact copy, and node/edge agreement through HF."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from meanablate import ablate  # noqa: E402
from meanablate.discovery.edge_families import gpt2_as_hooked  # noqa: E402
from meanablate.discovery.edges import run_edges  # noqa: E402
from meanablate.discovery.graph import build_graph  # noqa: E402


def _gpt2(seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=12, **kw
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_the_copy_reproduces_gpt2_with_padding():
    model = _gpt2()
    copy = gpt2_as_hooked(model)
    ids = torch.randint(0, 40, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    got = copy(ids, mask)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=1e-4)


def test_edges_of_a_gpt2_head_equal_ablating_the_head_through_hf():
    # Zero-ablating every edge out of a1... of a0.h1 equals zeroing head 1's input to
    # c_proj in the HF forward (meanablate's own HF site).
    model = _gpt2(1)
    ids = torch.randint(0, 40, (2, 6))
    graph = build_graph(2, 2, True)
    edges = [e.name for e in graph.edges_from("a0.h1")]
    got = run_edges(model, {"input_ids": ids}, edges, "zero")
    with (
        torch.no_grad(),
        ablate(model, "transformer.h.0.attn.c_proj@input[heads=1]", method="zero"),
    ):
        want = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    one = run_edges(model, {"input_ids": ids}, edges[:1], "zero")
    assert not torch.allclose(one, want, atol=1e-4)


def test_unsupported_gpt2_settings_are_named():
    model = _gpt2(activation_function="relu")
    with pytest.raises(ValueError, match="activation_function='relu'"):
        gpt2_as_hooked(model)
