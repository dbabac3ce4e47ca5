"""Edges on Hugging Face Llama-style and GPT-NeoX decoders (and bridges over them)
against a hand-written reference, the models' own forwards, and finite differences."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from hf_edge_reference import reference_forward, scaled, values  # noqa: E402
from meanablate import ablate, compute_means  # noqa: E402
from meanablate.discovery.edge_forward import edge_family  # noqa: E402
from meanablate.discovery.edge_sweep import edge_sweep  # noqa: E402
from meanablate.discovery.edges import EdgeData, edge_mask, run_edges  # noqa: E402
from meanablate.discovery.source import Source  # noqa: E402
from meanablate.metrics import get_metric  # noqa: E402

torch.set_num_threads(1)
V = 50


def llama(seed: int = 0, kv: int = 2, **kw):
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=kv,
        num_hidden_layers=2,
        vocab_size=V,
        max_position_embeddings=32,
        **kw,
    )
    torch.manual_seed(seed)
    return scaled(transformers.LlamaForCausalLM(cfg), seed)


def neox(seed: int = 0, parallel: bool = True, **kw):
    cfg = transformers.GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=V,
        max_position_embeddings=32,
        use_parallel_residual=parallel,
        **{"rotary_pct": 0.5, **kw},
    )
    torch.manual_seed(seed)
    return scaled(transformers.GPTNeoXForCausalLM(cfg), seed)


MODELS = {
    "llama-gqa": lambda s: llama(s),
    "llama-mha": lambda s: llama(s, kv=4),
    "qwen2-bias": lambda s: scaled(
        transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(
                hidden_size=32,
                intermediate_size=48,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_hidden_layers=2,
                vocab_size=V,
                max_position_embeddings=32,
            )
        ),
        s,
    ),
    "mistral-window": lambda s: scaled(
        transformers.MistralForCausalLM(
            transformers.MistralConfig(
                hidden_size=32,
                intermediate_size=48,
                num_attention_heads=4,
                num_key_value_heads=1,
                num_hidden_layers=2,
                vocab_size=V,
                max_position_embeddings=32,
                sliding_window=3,
            )
        ),
        s,
    ),
    "llama-biases-head-dim": lambda s: llama(s, attention_bias=True, mlp_bias=True, head_dim=12),
    "llama3-rope-tied": lambda s: llama(
        s,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 4,
            "rope_theta": 500000.0,
        },
    ),
    "qwen2-window-layer1": lambda s: scaled(
        transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(
                hidden_size=32,
                intermediate_size=48,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_hidden_layers=2,
                vocab_size=V,
                max_position_embeddings=32,
                use_sliding_window=True,
                sliding_window=3,
                max_window_layers=1,
            )
        ),
        s,
    ),
    "neox-parallel": lambda s: neox(s),
    "neox-no-bias-full-rotary": lambda s: neox(
        s, parallel=False, attention_bias=False, rotary_pct=1.0
    ),
    "neox-sequential": lambda s: neox(s, parallel=False),
}


def batch(seed: int, pad: str | None, b: int = 3, p: int = 6) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {
        "tokens": torch.randint(0, V, (b, p), generator=gen),
        "corrupt": torch.randint(0, V, (b, p), generator=gen),
    }
    target = torch.randint(0, V, (b, p), generator=gen)
    if pad:
        mask = torch.ones(b, p, dtype=torch.long)
        if pad == "left":
            mask[1, :2] = 0
        else:
            mask[1, -2:] = 0
        out["attention_mask"] = mask
        target[mask == 0] = -100
    out["target"] = target
    return out


def _real(b: dict) -> torch.Tensor:
    m = b.get("attention_mask")
    return torch.ones(b["tokens"].shape, dtype=torch.bool) if m is None else m.bool()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("pad", [None, "left", "right"])
def test_no_edges_ablated_equals_the_model_and_the_reference(name, pad):
    model = MODELS[name](0)
    b = batch(1, pad)
    mask = b.get("attention_mask")
    with torch.no_grad():
        want = model(input_ids=b["tokens"], attention_mask=mask).logits
        ref, _ = reference_forward(model, b["tokens"], mask, {}, set())
    got = run_edges(model, b, [])
    real = _real(b)
    assert torch.allclose(ref[real], want[real], atol=1e-4, rtol=1e-4)
    assert torch.allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(
    "kind,pad", [("zero", None), ("mean", "left"), ("counterfactual", "right")]
)
def test_edge_ablation_equals_the_reference(name, kind, pad):
    model = MODELS[name](2)
    b = batch(3, pad)
    graph = edge_family(model).graph()
    gen = torch.Generator().manual_seed(4)
    pick = torch.rand(len(graph), generator=gen) < 0.25
    edges = [e for e, p in zip(graph.edges, pick.tolist()) if p]
    assert any(e.qkv == "k" for e in edges) and any(e.qkv == "q" for e in edges)
    source = Source("counterfactual") if kind == "counterfactual" else kind
    got = run_edges(model, b, [e.name for e in edges], source)
    cut = {(e.src, e.dst_full) for e in edges}
    mask = b.get("attention_mask")
    with torch.no_grad():
        want, _ = reference_forward(model, b["tokens"], mask, values(model, b, kind), cut)
        clean = model(input_ids=b["tokens"], attention_mask=mask).logits
    real = _real(b)
    assert torch.allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
    assert (got[real] - clean[real]).abs().max() > 1e-2  # the ablation did something


def test_one_kv_input_edge_changes_only_its_query_head():
    # GQA: heads 0 and 1 share kv head 0; an edge into a0.h0<k> must leave a0.h1 alone.
    model = llama(5)
    b = batch(5, None)
    fam = edge_family(model)
    graph = fam.graph()
    data = EdgeData(model, [b], "zero")
    it = data.items[0]
    clean = fam.run(graph, it.tokens, None, keep_outs=True).outs
    mask = edge_mask(graph, ["input->a0.h0<k>"])
    cut = fam.run(graph, it.tokens, None, it.ablated, mask, keep_outs=True).outs
    i0, i1 = graph.src_index("a0.h0"), graph.src_index("a0.h1")
    assert (cut[i0] - clean[i0]).abs().max() > 1e-3
    assert torch.equal(cut[i1], clean[i1])


def test_neox_parallel_graph_has_no_same_layer_head_to_mlp_edges():
    par, seq = edge_family(neox(0)).graph(), edge_family(neox(0, parallel=False)).graph()
    assert par.parallel and not seq.parallel
    assert not [e for e in par.edges if e.dst == "m1" and e.src.startswith("a1.")]
    assert [e for e in seq.edges if e.dst == "m1" and e.src.startswith("a1.")]
    assert len(seq) - len(par) == 2 * 4


@pytest.mark.parametrize("name", ["llama-gqa", "neox-parallel"])
@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_node_circuit_equals_edges_between_kept_nodes(name, kind):
    model = MODELS[name](6)
    b = batch(7, "left")
    fam = edge_family(model)
    graph = fam.graph()
    kept = ["a0.h0", "a0.h3", "m0", "a1.h1", "a1.h2"]
    dropped = [n.name for n in graph.srcs if n.name not in kept and n.name != "input"]
    between = set(graph.between(kept))
    got = run_edges(model, b, [e for e in graph.names if e not in between], kind, means_from=[b])
    # the graph's node units are the model's own sites, which ablate() takes as they are
    sites = [graph.unit(node) for node in dropped]
    pre = "gpt_neox.layers.0" if hasattr(model, "gpt_neox") else "model.layers.0"
    assert sites[0].startswith(pre) and sites[0].endswith("@input[heads=1]")
    data = [{"input_ids": b["tokens"], "attention_mask": b["attention_mask"]}]
    kw = {"means": compute_means(model, sites, data)} if kind == "mean" else {}
    with torch.no_grad(), ablate(model, sites, method=kind, **kw):
        want = model(input_ids=b["tokens"], attention_mask=b["attention_mask"]).logits
    real = _real(b)
    assert torch.allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa", "neox-parallel", "neox-sequential"])
def test_eap_equals_finite_differences_of_the_edge_mask(name):
    from meanablate.discovery.eap import eap

    model = MODELS[name](8).double()
    b = batch(9, "right")
    data = EdgeData(model, [b], "mean")
    got = eap(model, data, metric="loss")
    m = get_metric("loss")
    eps = 1e-6
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.graph), generator=gen)[:25].tolist()
    it = data.items[0]
    for i in idx:
        mask = torch.zeros(len(data.graph), dtype=torch.float64)
        mask[i] = eps
        hi = m(data.logits(it, mask), it.batch, it.clean)
        lo = m(data.logits(it, -mask), it.batch, it.clean)
        want = (hi - lo) / (2 * eps)
        assert torch.allclose(got.per_example[i], want, atol=1e-6, rtol=1e-5), data.graph.names[i]
    assert got.per_example.abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama-gqa", "neox-parallel"])
def test_edge_sweep_equals_one_edge_at_a_time(name):
    model = MODELS[name](10)
    b = batch(11, "left", b=2, p=5)
    data = EdgeData(model, [b], Source("counterfactual"))
    got = edge_sweep(model, data, metric="kl")
    m = get_metric("kl")
    it = data.items[0]
    want = torch.stack(
        [
            m.effect(data.logits(it, edge_mask(data.graph, [n])), it.batch, it.clean).double()
            for n in data.graph.names
        ]
    )
    assert got.units == data.graph.names
    assert torch.allclose(got.per_example, want, atol=1e-5, rtol=1e-4)
    assert want.abs().max() > 1e-3


def _one_at_a_time(data, metric: str, names) -> torch.Tensor:
    m = get_metric(metric)
    rows = []
    for it in data.items:
        rows.append(
            torch.stack(
                [
                    m.effect(data.logits(it, edge_mask(data.graph, [n])), it.batch, it.clean)
                    for n in names
                ]
            ).double()
        )
    return torch.cat(rows, 1)


@pytest.mark.parametrize(
    ("name", "pad", "stack", "split", "metric"),
    [
        ("llama-gqa", "right", 3, True, "kl"),
        ("llama-gqa", None, 1, False, "loss"),
        ("mistral-window", "left", 4, True, "loss"),  # one kv head shared by all 4
        ("qwen2-bias", "left", 2, True, "kl"),
        ("llama-biases-head-dim", "right", 1, True, "l2"),
        ("neox-parallel", None, 3, True, "loss"),
        ("neox-parallel", "right", 1, False, "kl"),
        ("neox-sequential", "left", 5, True, "kl"),
        ("neox-no-bias-full-rotary", "right", 2, True, "loss"),
    ],
)
def test_edge_sweep_recomputing_one_head_equals_the_masked_forward(name, pad, stack, split, metric):
    # the sweep recomputes only the destination head / MLP / unembedding and resumes after
    # its block; the reference runs the whole masked edge forward per edge. Two batches
    # (one with the first positions unscored, so the metric reads a subset of positions),
    # stacked chunks that do not divide the edges into a destination.
    model = MODELS[name](20)
    b0 = batch(21, pad, b=2, p=5)
    b1 = batch(22, pad, b=3, p=5)
    b1["target"][:, :2] = -100
    data = EdgeData(model, [b0, b1], Source("counterfactual"), split_qkv=split)
    got = edge_sweep(model, data, metric=metric, stack=stack)
    want = _one_at_a_time(data, metric, data.graph.names)
    assert got.units == data.graph.names
    assert torch.allclose(got.per_example, want, atol=1e-5, rtol=1e-4)
    assert want.abs().max() > 1e-3
    kinds = {n.split("->")[1].split(".")[0][0] for n in data.graph.names}
    assert kinds == {"a", "m", "l"}  # head, MLP and logits destinations all swept


def test_edge_sweep_into_heads_sharing_a_kv_head_uses_each_heads_own_input():
    # GQA 4/2: query heads 0 and 1 share key/value head 0; an edge into h0<k> changes
    # only query head 0's copy of it, so the two edges' effects differ, and each equals
    # the masked forward. Also: a subset of edges, and the clean run reused between calls.
    model = MODELS["llama-gqa"](30)
    data = EdgeData(model, [batch(31, "left")], "zero")
    names = [f"{s}->a1.h{h}<{c}>" for s in ("input", "a0.h2", "m0") for h in (0, 1) for c in "kv"]
    first = edge_sweep(model, data, metric="kl", edges=names[:4], stack=2)
    got = edge_sweep(model, data, metric="kl", edges=names)
    want = _one_at_a_time(data, "kl", names)
    assert torch.allclose(got.per_example, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(first.per_example, got.per_example[:4])
    v = dict(zip(got.units, got.values))
    for s in ("input", "a0.h2", "m0"):
        for c in "kv":
            assert abs(float(v[f"{s}->a1.h0<{c}>"] - v[f"{s}->a1.h1<{c}>"])) > 1e-6


def test_bert_is_refused_with_the_reason():
    cfg = transformers.BertConfig(
        hidden_size=16,
        num_attention_heads=2,
        num_hidden_layers=1,
        intermediate_size=24,
        vocab_size=V,
    )
    bert = transformers.BertForMaskedLM(cfg).eval()
    with pytest.raises(ValueError, match=r"BertForMaskedLM: BERT is post-LN.*not the sum"):
        edge_family(bert)
    builder = pytest.importorskip("transformer_lens.model_bridge.sources")
    import copy

    bridge = builder.build_bridge_from_module(
        copy.deepcopy(bert), "BertForMaskedLM", hf_config=bert.config, model_name="bert-local"
    )
    with pytest.raises(ValueError, match="post-LN"):
        edge_family(bridge.eval())


def test_unsupported_rope_and_a_wrong_forward_are_refused():
    model = llama(0, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        edge_family(model)
    model = neox(0, hidden_dropout=0.1).train()
    with pytest.raises(ValueError, match=r"training mode with dropout.*model\.eval\(\)"):
        edge_family(model)
    edge_family(model.eval())
    model = llama(0)
    model.config._attn_implementation_internal = "my_kernel"
    with pytest.raises(ValueError, match=r"attention implementation 'my_kernel'.*sdpa"):
        edge_family(model)


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: sorted(vars(m)) for n, m in model.named_modules()},
        {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        },
    )


def _same(model, snap) -> None:
    state, dicts, hooks = _snapshot(model)
    assert state.keys() == snap[0].keys()
    assert all(torch.equal(state[k], snap[0][k]) for k in state)
    assert dicts == snap[1]  # no attribute added or replaced (e.g. a patched forward)
    assert hooks == snap[2]


@pytest.mark.parametrize("name", ["llama-gqa", "neox-parallel"])
def test_every_edge_algorithm_runs_and_leaves_the_model_as_it_was(name):
    from meanablate.discovery.eap import eap, eap_ig
    from meanablate.discovery.edge_prune import discover_edges
    from meanablate.discovery.mib import mib_curve, score_edge_circuit, to_mib_json
    from meanablate.discovery.path_patching import path_patching

    model = MODELS[name](12)
    b = batch(13, "left", b=2, p=5)
    snap = _snapshot(model)
    data = EdgeData(model, [b], "mean")
    _same(model, snap)
    runs = {
        "sweep": lambda: edge_sweep(model, data, metric="kl", edges=data.graph.names[:8]),
        "eap": lambda: eap(model, data, metric="loss"),
        "eap_ig": lambda: eap_ig(model, data, metric="kl", steps=2),
        "acdc": lambda: discover_edges(model, data, metric="kl", abs_threshold=1e-3),
        "attribute_verify": lambda: discover_edges(
            model, data, metric="kl", algorithm="attribute_verify", target_faithfulness=0.5
        ),
        "path": lambda: path_patching(
            model, [b], ["a0.h1"], ["a1.h2<k>"], Source("counterfactual"), metric="kl"
        ),
        "mib": lambda: mib_curve(data, out["eap"], "kl", percentages=(0.0, 0.1, 0.5, 1.0)),
        "score": lambda: score_edge_circuit(data, out["acdc"].kept, "kl"),
    }
    out = {}
    for key, fn in runs.items():
        out[key] = fn()
        _same(model, snap)
    assert 0 < len(out["acdc"].kept) < len(data.graph)
    assert out["mib"].faithfulness[-1] == pytest.approx(1.0)
    mib = to_mib_json(data.graph, out["eap"])
    assert mib["cfg"]["parallel_attn_mlp"] is data.graph.parallel


@pytest.mark.parametrize("name", ["llama-gqa", "neox-parallel"])
def test_path_patching_with_everything_frozen_equals_ablating_those_edges(name):
    from meanablate.discovery.path_patching import path_patching

    model = MODELS[name](14)
    b = batch(15, None, b=2, p=5)
    src = Source("counterfactual")
    # receivers that read no other receiver: pass 2 forces only what edges would change
    # (in the parallel NeoX graph the layer-1 MLP does not read layer 1's heads)
    receivers = ["a1.h2", "m1"] if name.startswith("neox") else ["a1.h2"]
    got = path_patching(model, [b], ["a0.h1"], receivers, src, metric="kl", freeze="all")
    data = EdgeData(model, [b], src)
    edges = [e.name for e in data.graph.edges_from("a0.h1") if e.dst in receivers]
    want = data.metric_of(edges, "kl")
    assert torch.allclose(got.per_example[0], want, atol=1e-6)
    assert want.abs().max() > 1e-4


def test_an_nnsight_wrapped_llama_gives_the_same_edges():
    nnsight = pytest.importorskip("nnsight")
    model = llama(16)
    b = batch(17, "right")
    edges = edge_family(model).graph().names[::9]
    got = run_edges(nnsight.NNsight(model), b, edges, "zero")
    assert torch.equal(got, run_edges(model, b, edges, "zero"))


_MODELS_12 = {"llama": llama(12), "neox": neox(12)}


@settings(max_examples=12, deadline=None)
@given(
    which=st.sampled_from(sorted(_MODELS_12)),
    seed=st.integers(0, 2**16),
    frac=st.floats(0.0, 1.0),
    pad=st.sampled_from([None, "left", "right"]),
    kind=st.sampled_from(["zero", "mean", "counterfactual"]),
)
def test_random_edge_sets_equal_the_reference(which, seed, frac, pad, kind):
    model = _MODELS_12[which]
    b = batch(seed, pad, b=2, p=5)
    graph = edge_family(model).graph()
    gen = torch.Generator().manual_seed(seed)
    edges = [e for e in graph.edges if float(torch.rand(1, generator=gen)) < frac]
    source = Source("counterfactual") if kind == "counterfactual" else kind
    got = run_edges(model, b, [e.name for e in edges], source)
    cut = {(e.src, e.dst_full) for e in edges}
    mask = b.get("attention_mask")
    with torch.no_grad():
        want, _ = reference_forward(model, b["tokens"], mask, values(model, b, kind), cut)
    real = _real(b)
    assert torch.allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_run_in_their_dtype(dtype):
    model = llama(18).to(dtype)
    b = batch(19, "left")
    got = run_edges(model, b, [])
    with torch.no_grad():
        want = model(input_ids=b["tokens"], attention_mask=b["attention_mask"]).logits
        ref = llama(18)(input_ids=b["tokens"], attention_mask=b["attention_mask"]).logits
    real = _real(b)
    assert got.dtype == dtype
    tol = 16 * torch.finfo(dtype).eps * (float(want.abs().max()) + 1)
    assert (got[real] - want[real]).abs().max() <= tol
    # and no further from the float32 model than the Hugging Face forward in that dtype is
    err_ours = (got[real].float() - ref[real]).abs().max()
    err_hf = (want[real].float() - ref[real]).abs().max()
    assert err_ours <= 2 * err_hf + 1e-3
