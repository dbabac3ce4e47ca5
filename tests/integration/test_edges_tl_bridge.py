"""Edges on TransformerLens 4 bridges (over our transformer and over HF GPT-2), against the
hand-written edge reference and against TransformerLens's own ``run_with_hooks``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens.model_bridge")
transformers = pytest.importorskip("transformers")

from edge_reference import random_model, reference_forward  # noqa: E402
from meanablate.adapters import transformer_lens as tla  # noqa: E402
from meanablate.discovery import EdgeData, edge_sweep  # noqa: E402
from meanablate.discovery.edges import run_edges  # noqa: E402
from meanablate.discovery.graph import build_graph  # noqa: E402
from meanablate.discovery.source import Source  # noqa: E402
from meanablate.organisms.transformer import TransformerConfig  # noqa: E402

torch.set_num_threads(1)

CFG = TransformerConfig(
    n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=7, n_ctx=6, d_mlp=12, normalization="LN"
)


def _values(model, batch, kind):
    """What an ablated edge carries, from the reference forward on the original model."""
    tokens = batch["tokens"]
    _, outs = reference_forward(model, tokens, None, {}, set())
    if kind == "zero":
        return {k: torch.zeros_like(v) for k, v in outs.items()}
    if kind == "mean":
        return {k: v.expand(*tokens.shape, v.shape[-1]).mean((0, 1)) for k, v in outs.items()}
    _, cf = reference_forward(model, batch["corrupt"], None, {}, set())
    return cf


@pytest.mark.parametrize("kind", ["zero", "mean", "counterfactual"])
@pytest.mark.parametrize("seed", [0, 1])
def test_edges_on_a_native_bridge_equal_the_reference_forward(kind, seed):
    model = random_model(CFG, seed)
    bridge = tla.to_transformer_bridge(model)
    gen = torch.Generator().manual_seed(seed)
    batch = {
        "tokens": torch.randint(0, 7, (3, 5), generator=gen),
        "corrupt": torch.randint(0, 7, (3, 5), generator=gen),
    }
    graph = build_graph(2, 2, True)
    pick = torch.rand(len(graph), generator=gen) < 0.3
    edges = [e for e, p in zip(graph.edges, pick.tolist()) if p]
    source = Source("counterfactual") if kind == "counterfactual" else kind
    got = run_edges(bridge, batch, [e.name for e in edges], source)
    cut = {(e.src, e.dst_full) for e in edges}
    with torch.no_grad():
        want, _ = reference_forward(model, batch["tokens"], None, _values(model, batch, kind), cut)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    # and the model's edges equal the bridge's, edge for edge
    assert torch.allclose(got, run_edges(model, batch, [e.name for e in edges], source), atol=1e-5)


def _hf_bridge(seed: int = 1, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=12, **kw
    )
    return tla.bridge_from_hf_gpt2(transformers.GPT2LMHeadModel(cfg).eval())


def test_edges_of_a_head_on_a_gpt2_bridge_equal_zeroing_it_with_tl_hooks():
    bridge = _hf_bridge()
    ids = torch.randint(0, 40, (2, 6))
    graph = build_graph(2, 2, True)
    edges = [e.name for e in graph.edges_from("a0.h1")]
    got = run_edges(bridge, ids, edges, "zero")

    def zero_head(z, hook):  # TL's shape: [batch, pos, head, d_head]
        z = z.clone()
        z[:, :, 1] = 0
        return z

    with torch.no_grad():
        want = bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    one = run_edges(bridge, ids, edges[:1], "zero")  # one reader alone: not the node
    assert not torch.allclose(one, want, atol=1e-4)
    # the sweep runs on the bridge too (exact: the EdgeData path, one edge at a time)
    data = EdgeData(bridge, [ids], "zero")
    s = edge_sweep(bridge, data, metric="kl", edges=edges[:2])
    for name in edges[:2]:
        assert s[name] == pytest.approx(float(data.metric_of([name], "kl").mean()), abs=1e-6)


def test_a_llama_bridge_is_refused_with_the_reason():
    import copy

    from transformer_lens.model_bridge.sources import build_bridge_from_module

    cfg = transformers.LlamaConfig(
        num_hidden_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=20,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    br = build_bridge_from_module(
        copy.deepcopy(hf), "LlamaForCausalLM", hf_config=hf.config, model_name="llama-local"
    ).eval()
    with pytest.raises(ValueError, match=r"GPT-2-like architecture.*normalization_type='RMS'"):
        run_edges(br, torch.zeros(1, 3, dtype=torch.long), [])
