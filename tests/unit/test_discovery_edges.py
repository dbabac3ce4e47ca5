"""Edge ablation against a hand-written reference, node/edge agreement, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_reference import node_names, random_model, reference_forward
from meanablate import ablate, compute_means
from meanablate.discovery.edges import EdgeData, run_edges
from meanablate.discovery.graph import build_graph, node_unit
from meanablate.discovery.source import Source
from meanablate.organisms.transformer import TransformerConfig


def _cfg(norm: bool, mlp: bool, causal: bool = True) -> TransformerConfig:
    return TransformerConfig(
        n_layers=2,
        d_model=8,
        n_heads=2,
        d_head=4,
        d_vocab=7,
        n_ctx=6,
        d_mlp=12 if mlp else None,
        normalization="LN" if norm else None,
        causal=causal,
    )


def _reference_values(model, batch, kind: str):
    """What an ablated edge carries, computed with the reference forward alone."""
    tokens, mask = batch["tokens"], batch.get("attention_mask")
    _, outs = reference_forward(model, tokens, mask, {}, set())
    if kind == "zero":
        return {k: torch.zeros_like(v) for k, v in outs.items()}
    if kind in ("mean", "mean-positional"):
        w = mask.double() if mask is not None else torch.ones(tokens.shape, dtype=torch.float64)
        res = {}
        for k, v in outs.items():
            v = v.expand(*tokens.shape, v.shape[-1]).double()
            if kind == "mean":
                res[k] = ((v * w[..., None]).sum((0, 1)) / w.sum()).float()
            else:
                res[k] = ((v * w[..., None]).sum(0) / w.sum(0).clamp(min=1)[:, None]).float()
        return res
    other = batch["corrupt"] if kind == "noising" else tokens
    _, cf = reference_forward(model, other, mask, {}, set())
    return cf


@settings(max_examples=25, deadline=None)
@given(
    norm=st.booleans(),
    mlp=st.booleans(),
    causal=st.booleans(),
    pad=st.booleans(),
    kind=st.sampled_from(["zero", "mean", "mean-positional", "noising", "denoising"]),
    seed=st.integers(0, 10_000),
    split=st.booleans(),
)
def test_edge_ablation_equals_the_reference_forward(norm, mlp, causal, pad, kind, seed, split):
    cfg = _cfg(norm, mlp, causal)
    model = random_model(cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (3, 5), generator=gen)
    batch = {"tokens": tokens, "corrupt": torch.randint(0, 7, (3, 5), generator=gen)}
    if pad:
        mask = torch.ones(3, 5, dtype=torch.long)
        mask[0, 3:] = 0
        batch["attention_mask"] = mask
    graph = build_graph(2, 2, mlp, split_qkv=split)
    pick = torch.rand(len(graph), generator=gen) < 0.3
    edges = [e for e, p in zip(graph.edges, pick.tolist()) if p]
    source = {
        "zero": "zero",
        "mean": "mean",
        "mean-positional": "mean-positional",
        "noising": Source("counterfactual"),
        "denoising": Source("counterfactual", direction="denoising"),
    }[kind]
    got = run_edges(model, batch, [e.name for e in edges], source, split_qkv=split)
    values = _reference_values(model, batch, kind)
    base = batch["corrupt"] if kind == "denoising" else tokens
    cut = {(e.src, e.dst_full) for e in edges}
    if not split:  # one input per head: the reference reads it three times
        cut = {(s, d) for s, d in cut}
    with torch.no_grad():
        want, _ = reference_forward(model, base, batch.get("attention_mask"), values, cut, split)
    real = batch.get("attention_mask", torch.ones(3, 5)).bool()
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=1e-4)


def test_no_ablated_edge_is_the_model_itself():
    model = random_model(_cfg(True, True), 1)
    tokens = torch.randint(0, 7, (2, 5))
    assert torch.allclose(run_edges(model, tokens, []), model(tokens), atol=1e-5)


def test_ablating_one_edge_leaves_other_readers_clean():
    model = random_model(_cfg(False, True), 2)
    tokens = torch.randint(0, 7, (2, 5))
    graph = build_graph(2, 2, True)
    # m0 -> a1.h0<q> alone: a1.h1 and m1 and the logits still read m0's clean output,
    # so ablating instead every edge out of m0 must differ.
    one = run_edges(model, tokens, ["m0->a1.h0<q>"])
    every = run_edges(model, tokens, [e.name for e in graph.edges_from("m0")])
    with ablate(model, "blocks.0.hook_mlp_out", method="zero"):
        node = model(tokens)
    assert torch.allclose(every, node, atol=1e-5)
    assert not torch.allclose(one, every, atol=1e-3)


@pytest.mark.parametrize("kind", ["mean", "mean-positional", "counterfactual"])
def test_node_circuit_equals_edges_between_its_nodes(kind):
    cfg = _cfg(True, True)
    model = random_model(cfg, 3)
    gen = torch.Generator().manual_seed(3)
    batches = [
        {
            "tokens": torch.randint(0, 7, (4, 5), generator=gen),
            "corrupt": torch.randint(0, 7, (4, 5), generator=gen),
        }
        for _ in range(2)
    ]
    nodes = node_names(cfg)[1:]
    kept = ["a0.h1", "m0", "a1.h0"]
    ablated_units = [node_unit(n) for n in nodes if n not in kept]
    data = EdgeData(model, batches, kind)
    graph = data.graph
    edge_ablated = [e.name for e in graph.edges if e.name not in set(graph.between(kept))]
    got = torch.cat(
        [data.logits(it, None if False else _mask(graph, edge_ablated)) for it in data.items]
    )
    want = []
    if kind == "counterfactual":
        for b in batches:
            with ablate(model, ablated_units, method="resample", source=b["corrupt"]):
                want.append(model(b["tokens"]))
    else:
        sites = sorted({u.split("[")[0] for u in ablated_units})
        means = compute_means(model, sites, batches, per_position=kind == "mean-positional")
        for b in batches:
            with ablate(model, ablated_units, means):
                want.append(model(b["tokens"]))
    assert torch.allclose(got, torch.cat(want), atol=1e-5, rtol=1e-4)


def _mask(graph, names):
    from meanablate.discovery.edges import edge_mask

    return edge_mask(graph, names)


def test_bad_edges_and_batches_give_clear_errors():
    model = random_model(_cfg(False, True), 4)
    tokens = torch.randint(0, 7, (2, 5))
    with pytest.raises(ValueError, match="does not exist"):
        run_edges(model, tokens, ["a1.h0->a0.h0<q>"])
    with pytest.raises(ValueError, match="not an edge name"):
        run_edges(model, tokens, ["a0.h0 to logits"])
    with pytest.raises(ValueError, match=r"batch\['corrupt'\] has shape \(2, 4\)"):
        run_edges(model, {"tokens": tokens, "corrupt": tokens[:, :4]}, [], "counterfactual")
    with pytest.raises(ValueError, match="needs batch\\['corrupt'\\]"):
        run_edges(model, {"tokens": tokens}, [], "counterfactual")
    m1 = torch.ones(2, 5, dtype=torch.long)
    m2 = m1.clone()
    m2[0, 4] = 0
    bad = {"tokens": tokens, "corrupt": tokens, "attention_mask": m1, "corrupt_attention_mask": m2}
    with pytest.raises(ValueError, match="pad the same positions"):
        run_edges(model, bad, [], "counterfactual")
    handle = model.blocks[0].mlp.hook_post.register_forward_hook(lambda m, a, o: o * 0)
    try:
        with pytest.raises(ValueError, match="carries forward hooks"):
            run_edges(model, tokens, [])
    finally:
        handle.remove()
    with pytest.raises(TypeError, match="edges are not described for Sequential"):
        run_edges(torch.nn.Sequential(torch.nn.Linear(2, 2)), tokens, [])


def _cf_batches(seed: int = 11, pad: bool = True):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        tokens = torch.randint(0, 7, (3, 5), generator=gen)
        target = torch.randint(0, 7, (3, 5), generator=gen)
        b = {"tokens": tokens, "corrupt": torch.randint(0, 7, (3, 5), generator=gen)}
        if pad:
            mask = torch.ones(3, 5, dtype=torch.long)
            mask[2, 4] = 0
            target[2, 4] = -100
            b["attention_mask"] = mask
        b["target"] = target
        out.append(b)
    return out


@pytest.mark.parametrize("metric", ["kl", "loss"])
def test_counterfactual_node_sweep_equals_ablate_resample(metric):
    from meanablate.discovery import sweep, transformer_units
    from meanablate.metrics import get_metric

    model = random_model(_cfg(True, True), 12)
    batches = _cf_batches()
    units = transformer_units(model, "components")
    got = sweep(model, batches, units, None, metric=metric, method="resample")
    m = get_metric(metric)
    want = []
    for u in units:
        row = []
        for b in batches:
            src = {"tokens": b["corrupt"], "attention_mask": b["attention_mask"]}
            with torch.no_grad():
                clean = model(b["tokens"], b["attention_mask"])
                with ablate(model, u, method="resample", source=src):
                    out = model(b["tokens"], b["attention_mask"])
            row.append(m.effect(out, b, clean).double())
        want.append(torch.cat(row))
    assert torch.allclose(got.per_example, torch.stack(want), atol=1e-5, rtol=1e-4)
    assert got.per_example.abs().max() > 1e-3


def test_counterfactual_node_attribution_is_the_sum_of_its_edges_eap():
    # d metric / d out_src is the sum of every reader's input gradient, so a node's
    # attribution equals the sum of EAP over its outgoing edges (an independent path).
    from meanablate.discovery import attribute, transformer_units
    from meanablate.discovery.eap import eap
    from meanablate.discovery.graph import unit_node

    model = random_model(_cfg(True, True), 13).double()
    batches = _cf_batches(13)
    units = transformer_units(model, "components")
    node = attribute(model, batches, units, None, metric="loss", method="resample")
    edges = eap(model, batches, "counterfactual", metric="loss")
    graph = build_graph(2, 2, True)
    for u, value in node.as_dict().items():
        total = sum(edges.as_dict()[e.name] for e in graph.edges_from(unit_node(u)))
        assert value == pytest.approx(total, rel=1e-6, abs=1e-9)


def test_counterfactual_discover_and_bad_batches():
    from meanablate.discovery import discover, metric_per_example, transformer_units

    model = random_model(_cfg(True, True), 14)
    batches = _cf_batches(14)
    units = transformer_units(model, "components")
    c = discover(model, batches, None, units=units, metric="kl", threshold=0.05, method="resample")
    ablated = [u for u in units if u not in set(c.kept)]
    direct = metric_per_example(model, batches, ablated, None, "kl", method="resample")
    assert c.metric_circuit == pytest.approx(float(direct.mean()), abs=1e-6)
    no_corrupt = [{k: v for k, v in b.items() if k != "corrupt"} for b in batches]
    with pytest.raises(ValueError, match="needs batch\\['corrupt'\\]"):
        discover(
            model, no_corrupt, None, units=units, metric="kl", threshold=0.05, method="resample"
        )
