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


def _hf_decoder_bridge(name: str, seed: int = 0):
    import copy

    from transformer_lens.model_bridge.sources import build_bridge_from_module

    from hf_edge_reference import scaled

    if name == "llama":
        cfg = transformers.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=40,
            intermediate_size=48,
            max_position_embeddings=16,
        )
        hf, arch = transformers.LlamaForCausalLM(cfg), "LlamaForCausalLM"
    else:
        cfg = transformers.GPTNeoXConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            vocab_size=40,
            intermediate_size=48,
            max_position_embeddings=16,
            rotary_pct=0.5,
        )
        hf, arch = transformers.GPTNeoXForCausalLM(cfg), "GPTNeoXForCausalLM"
    hf = scaled(hf, seed)
    br = build_bridge_from_module(
        copy.deepcopy(hf), arch, hf_config=hf.config, model_name=f"{name}-local"
    ).eval()
    return hf, br


@pytest.mark.parametrize("name", ["llama", "neox"])
def test_edges_on_a_llama_or_neox_bridge_equal_the_hf_model_and_tl_hooks(name):
    hf, br = _hf_decoder_bridge(name)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    batch = {"tokens": ids, "attention_mask": mask, "corrupt": torch.randint(0, 40, (2, 6))}
    graph = build_graph(2, 4, True, parallel=name == "neox")
    pick = torch.rand(len(graph), generator=gen) < 0.3
    edges = [e.name for e, p in zip(graph.edges, pick.tolist()) if p]
    real = mask.bool()
    for source in ("zero", "mean", Source("counterfactual")):
        got = run_edges(br, batch, edges, source)
        want = run_edges(hf, batch, edges, source)
        assert torch.allclose(got[real], want[real], atol=1e-5, rtol=1e-4)
    # every edge out of a0.h1, zeroed, is the head zeroed through TransformerLens's hooks
    out = [e.name for e in graph.edges_from("a0.h1")]

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    with torch.no_grad():
        want = br.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
    got = run_edges(br, ids, out, "zero")
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(run_edges(br, ids, out[:1], "zero"), want, atol=1e-4)
    # the sweep on the bridge equals the HF model's
    names = edges[:6]
    a = edge_sweep(br, [batch], Source("counterfactual"), edges=names, metric="kl")
    b = edge_sweep(hf, [batch], Source("counterfactual"), edges=names, metric="kl")
    assert torch.allclose(a.per_example, b.per_example, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "neox"])
def test_edge_algorithms_leave_a_llama_or_neox_bridge_as_it_was(name):
    from meanablate.discovery import discover_edges, eap

    _, br = _hf_decoder_bridge(name, seed=2)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 40, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :1] = 0
    target = torch.where(mask.bool(), torch.randint(0, 40, (2, 6), generator=gen), -100)
    batch = {"tokens": ids, "attention_mask": mask, "target": target}
    with torch.no_grad():  # TransformerLens's own forwards set their bookkeeping first
        br(ids)
        br(ids, attention_mask=mask)

    def snapshot():
        return (
            {k: v.clone() for k, v in br.state_dict().items()},
            {n: sorted(vars(m)) for n, m in br.named_modules()},
            {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in br.named_modules()},
        )

    def same(a, b):
        assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
        assert a[1] == b[1] and a[2] == b[2]

    before = snapshot()
    data = EdgeData(br, [batch], "mean")
    same(snapshot(), before)
    eap(br, data, metric="loss")
    same(snapshot(), before)
    edge_sweep(br, data, metric="kl", edges=data.graph.names[:5])
    same(snapshot(), before)
    discover_edges(br, data, metric="kl", abs_threshold=1e-2)
    same(snapshot(), before)
