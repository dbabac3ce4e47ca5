"""Edge sweep, EAP, EAP-IG, ACDC over edges and path patching against references."""

from __future__ import annotations

import pytest
import torch

from edge_reference import random_model
from meanablate.discovery.edge_sweep import edge_sweep
from meanablate.discovery.edges import EdgeData, edge_mask
from meanablate.discovery.source import Source
from meanablate.metrics import get_metric
from meanablate.organisms.transformer import TransformerConfig


def _setup(mlp: bool = True, norm: bool = True, seed: int = 0, pad: bool = False):
    cfg = TransformerConfig(
        n_layers=2,
        d_model=8,
        n_heads=2,
        d_head=4,
        d_vocab=7,
        n_ctx=6,
        d_mlp=12 if mlp else None,
        normalization="LN" if norm else None,
    )
    model = random_model(cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        tokens = torch.randint(0, 7, (3, 5), generator=gen)
        target = torch.randint(0, 7, (3, 5), generator=gen)
        target[:, :2] = -100
        b = {
            "tokens": tokens,
            "corrupt": torch.randint(0, 7, (3, 5), generator=gen),
            "target": target,
        }
        if pad:
            mask = torch.ones(3, 5, dtype=torch.long)
            mask[1, 4] = 0
            b["attention_mask"] = mask
            target[1, 4] = -100
        batches.append(b)
    return model, batches


def _one_by_one(data: EdgeData, metric: str) -> torch.Tensor:
    m = get_metric(metric)
    rows = []
    for e in data.graph.edges:
        mask = edge_mask(data.graph, [e.name])
        per = []
        for it in data.items:
            per.append(m.effect(data.logits(it, mask), it.batch, it.clean).double())
        rows.append(torch.cat(per))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "mlp,norm,source,metric,pad",
    [
        (True, True, "mean", "kl", False),
        (True, False, "zero", "loss", True),
        (False, True, Source("counterfactual"), "kl", True),
        (True, True, Source("counterfactual", direction="denoising"), "loss", False),
        (True, True, "mean-positional", "logit_diff_free", False),
    ],
)
def test_edge_sweep_equals_one_edge_at_a_time(mlp, norm, source, metric, pad):
    model, batches = _setup(mlp, norm, pad=pad)
    if metric == "logit_diff_free":
        metric = "l2"
    data = EdgeData(model, batches, source)
    got = edge_sweep(model, data, metric=metric, stack=3)
    want = _one_by_one(data, metric)
    assert got.units == data.graph.names
    assert torch.allclose(got.per_example, want, atol=2e-5, rtol=1e-4)
    assert got.per_example.abs().max() > 1e-3  # not trivially zero


def test_edge_sweep_subset_and_size_guard():
    model, batches = _setup()
    data = EdgeData(model, batches, "zero")
    names = ["a0.h1->a1.h0<k>", "m1->logits"]
    s = edge_sweep(model, data, edges=names, metric="kl")
    full = edge_sweep(model, data, metric="kl")
    assert s.units == names
    assert torch.allclose(s.values, torch.tensor([full.as_dict()[n] for n in names]).double())
    with pytest.raises(ValueError, match=r"over 46 edges .* max_edges=10.*eap\(\)"):
        edge_sweep(model, data, metric="kl", max_edges=10)


def _double(model):
    return model.double()


@pytest.mark.parametrize("source", ["mean", "zero", Source("counterfactual")])
@pytest.mark.parametrize("metric", ["loss", "logit_diff"])
def test_eap_equals_finite_differences_of_the_edge_mask(source, metric):
    from meanablate.discovery.eap import eap

    model, batches = _setup(seed=5, pad=True)
    model = _double(model)
    if metric == "logit_diff":
        for b in batches:
            b["wrong"] = (b["target"] + 1) % 7
            b["wrong"][b["target"] == -100] = -100
    data = EdgeData(model, batches, source)
    got = eap(model, data, metric=metric)
    m = get_metric(metric)
    eps = 1e-6
    want = []
    for e in data.graph.edges:
        mask = torch.zeros(len(data.graph), dtype=torch.float64)
        mask[e.index] = eps
        per = []
        for it in data.items:
            hi = m(data.logits(it, mask), it.batch, it.clean)
            lo = m(data.logits(it, -mask), it.batch, it.clean)
            per.append((hi - lo) / (2 * eps))
        want.append(torch.cat(per))
    want = torch.stack(want)
    assert not got.exact.any() and got.method == "eap"
    assert torch.allclose(got.per_example, want, atol=1e-6, rtol=1e-5)
    assert want.abs().max() > 1e-3


def test_eap_refuses_kl_and_eap_ig_converges_to_the_integral():
    from meanablate.discovery.eap import eap, eap_ig

    model, batches = _setup(seed=6)
    model = _double(model)
    data = EdgeData(model, batches[:1], "mean")
    with pytest.raises(ValueError, match="gradient at the clean run is zero"):
        eap(model, data, metric="kl")
    # Integrated gradients are complete: the scores sum to m(all ablated) - m(clean).
    ig = eap_ig(model, data, metric="kl", steps=100)
    everything = data.metric_of(torch.ones(len(data.graph), dtype=torch.float64), "kl")
    assert ig.per_example.sum(0) == pytest.approx(everything.tolist(), rel=2e-2, abs=1e-4)
    one = eap_ig(model, data, metric="loss", steps=1)
    m = get_metric("loss")
    assert one.method == "eap_ig" and one.values.abs().max() > 0
    assert m.name == "loss"


def _naive_acdc(data: EdgeData, metric: str, threshold: float):
    mask = torch.zeros(len(data.graph))
    current = float(data.metric_of(mask, metric).mean())
    scores = {}
    order = sorted(data.graph.edges, key=lambda e: (-e.dst_index, -e.src_index))
    for e in order:
        mask[e.index] = 1
        trial = float(data.metric_of(mask, metric).mean())
        scores[e.name] = trial - current
        if trial - current < threshold:
            current = trial
        else:
            mask[e.index] = 0
    return [e.name for e in data.graph.edges if mask[e.index] == 0], scores, current


@pytest.mark.parametrize("metric,threshold", [("kl", 0.02), ("loss", 0.05), ("kl", 0.0)])
def test_acdc_over_edges_equals_a_naive_acdc(metric, threshold):
    from meanablate.discovery.edge_prune import discover_edges

    model, batches = _setup(seed=7, pad=True)
    data = EdgeData(model, batches, "mean")
    c = discover_edges(model, data, metric=metric, abs_threshold=threshold)
    kept, scores, current = _naive_acdc(data, metric, threshold)
    assert c.kept == kept
    assert 0 < len(kept) < len(data.graph) or threshold == 0.0
    for k, v in scores.items():
        assert c.scores[k] == pytest.approx(v, abs=1e-5)
    assert c.metric_circuit == pytest.approx(current, abs=1e-5)
    assert c.units == data.graph.names


@pytest.mark.parametrize("algorithm", ["sweep", "eap", "eap_ig", "attribute_verify"])
def test_score_then_prune_over_edges_reaches_the_target(algorithm):
    from meanablate.discovery.edge_prune import discover_edges

    model, batches = _setup(seed=8)
    data = EdgeData(model, batches, "zero")
    c = discover_edges(model, data, metric="loss", algorithm=algorithm, target_faithfulness=0.8)
    assert c.faithfulness >= 0.8
    mask = edge_mask(data.graph, [n for n in data.graph.names if n not in set(c.kept)])
    assert float(data.metric_of(mask, "loss").mean()) == pytest.approx(c.metric_circuit, abs=1e-6)
    assert len(c.kept) < len(data.graph)


def test_discover_edges_bad_arguments():
    from meanablate.discovery.edge_prune import discover_edges

    model, batches = _setup()
    with pytest.raises(ValueError, match="exactly one of threshold"):
        discover_edges(model, batches, "zero")
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\)"):
        discover_edges(model, batches, "zero", threshold=2.0)
    data = EdgeData(model, batches, "zero")
    rel = discover_edges(model, data, metric="kl", threshold=0.01)
    ab = discover_edges(model, data, metric="kl", abs_threshold=rel.abs_threshold)
    assert rel.kept == ab.kept and rel.abs_threshold == pytest.approx(0.01 * rel.metric_empty)
    with pytest.raises(ValueError, match="unknown algorithm 'magic'"):
        discover_edges(model, batches, "zero", algorithm="magic")
    with pytest.raises(ValueError, match="thresholds are for acdc"):
        discover_edges(model, batches, "zero", algorithm="eap", threshold=0.1)


def _hook_path_patching(model, batch, senders, receivers, freeze, metric):
    """Two passes with plain torch hooks on the model's hook points (no edge code)."""
    from meanablate.hooks import capture

    cfg = model.cfg
    tokens, corrupt = batch["tokens"], batch["corrupt"]
    keys = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]
    keys += [f"blocks.{layer}.hook_mlp_out" for layer in range(cfg.n_layers)]
    keys += [f"blocks.{layer}.attn.hook_{c}" for layer in range(cfg.n_layers) for c in "qkv"]
    keys += [f"blocks.{layer}.hook_mlp_in" for layer in range(cfg.n_layers)]
    keys += [f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
    with torch.no_grad(), capture(model, keys) as clean:
        clean_logits = model(tokens)
    with torch.no_grad(), capture(model, keys) as bad:
        model(corrupt)
    clean, bad = dict(clean), dict(bad)
    mods = dict(model.named_modules())

    def z_hook(layer):
        def hook(_m, _a, out):
            out = out.clone()
            for h in range(cfg.n_heads):
                name = f"a{layer}.h{h}"
                src = bad if name in senders else clean
                out[:, :, h] = src[f"blocks.{layer}.attn.hook_z"][:, :, h]
            return out

        return hook

    def mlp_hook(layer):
        def hook(_m, _a, out):
            if f"m{layer}" in senders:
                return bad[f"blocks.{layer}.hook_mlp_out"]
            if freeze == "all":
                return clean[f"blocks.{layer}.hook_mlp_out"]
            return out

        return hook

    handles = []
    try:
        for layer in range(cfg.n_layers):
            handles.append(mods[f"blocks.{layer}.attn.hook_z"].register_forward_hook(z_hook(layer)))
            handles.append(
                mods[f"blocks.{layer}.hook_mlp_out"].register_forward_hook(mlp_hook(layer))
            )
        with torch.no_grad(), capture(model, keys) as first:
            model(tokens)
        first = dict(first)
    finally:
        for hd in handles:
            hd.remove()
    handles = []

    def patch(key, head=None):
        def hook(_m, _a, out):
            out = out.clone()
            if head is None:
                return first[key]
            out[:, :, head] = first[key][:, :, head]
            return out

        return hook

    try:
        for r in receivers:
            if r == "logits":
                key = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
                handles.append(mods[key].register_forward_hook(patch(key)))
            elif r.startswith("m"):
                key = f"blocks.{r[1:]}.hook_mlp_in"
                handles.append(mods[key].register_forward_hook(patch(key)))
            else:
                node, c = r[:-3], r[-2]
                layer, h = int(node[1:].split(".")[0]), int(node.split(".h")[1])
                key = f"blocks.{layer}.attn.hook_{c}"
                handles.append(mods[key].register_forward_hook(patch(key, h)))
        with torch.no_grad():
            logits = model(tokens)
    finally:
        for hd in handles:
            hd.remove()
    return get_metric(metric).effect(logits, batch, clean_logits)


@pytest.mark.parametrize("freeze", ["all", "heads"])
@pytest.mark.parametrize(
    "senders,receivers",
    [
        (["a0.h1"], ["a1.h0<k>"]),
        (["a0.h0", "m0"], ["a1.h1<q>", "a1.h0<v>"]),
        (["a1.h1"], ["logits"]),
        (["a0.h0"], ["m1", "logits"]),
    ],
)
def test_path_patching_equals_a_two_pass_hook_reference(freeze, senders, receivers):
    from meanablate.discovery.path_patching import path_patching

    model, batches = _setup(seed=9)
    got = path_patching(
        model, batches, [senders], receivers, "counterfactual", metric="loss", freeze=freeze
    )
    want = torch.cat(
        [_hook_path_patching(model, b, senders, receivers, freeze, "loss") for b in batches]
    )
    assert torch.allclose(got.per_example[0], want.double(), atol=2e-5, rtol=1e-4)
    assert want.abs().max() > 1e-4
    # With every node frozen only the direct edges carry the change: the same as ablating
    # them — unless one receiver reads another (m1 -> logits), whose input pass 2 forces.
    if freeze == "all" and receivers != ["m1", "logits"]:
        data = EdgeData(model, batches, "counterfactual")
        names = [
            e.name
            for e in data.graph.edges
            if e.src in senders and (e.dst_full in receivers or e.dst in receivers)
        ]
        m = get_metric("loss")
        mask = edge_mask(data.graph, names)
        direct = torch.cat(
            [m.effect(data.logits(it, mask), it.batch, it.clean) for it in data.items]
        )
        assert torch.allclose(got.per_example[0], direct.double(), atol=2e-5, rtol=1e-4)


def test_path_patching_bad_receiver():
    from meanablate.discovery.path_patching import path_patching

    model, batches = _setup()
    with pytest.raises(ValueError, match=r"receiver 'a9\.h0' is not a destination"):
        path_patching(model, batches, ["a0.h0"], ["a9.h0"])
    with pytest.raises(ValueError, match=r"node 'a5\.h5' is not a source node"):
        path_patching(model, batches, ["a5.h5"], ["logits"])


@pytest.mark.parametrize(
    "mlp,norm,split",
    [(True, True, True), (False, True, True), (True, False, True), (True, True, False)],
)
def test_fast_eap_equals_the_masked_forward_probes(mlp, norm, split):
    from meanablate.discovery.eap import eap

    model, batches = _setup(mlp=mlp, norm=norm, seed=10, pad=True)
    model = model.double()
    data = EdgeData(model, batches, Source("counterfactual"), split_qkv=split)
    fast = eap(model, data, metric="loss", fast=True)
    slow = eap(model, data, metric="loss", fast=False)
    assert torch.allclose(fast.per_example, slow.per_example, atol=1e-9, rtol=1e-7)
    assert fast.per_example.abs().max() > 1e-3


@pytest.mark.parametrize("metric", ["prob", "custom"])
def test_fast_eap_other_metrics_and_the_model_left_as_it_was(metric):
    from meanablate.discovery.eap import eap
    from meanablate.metrics import Metric, loss

    model, batches = _setup(seed=11, pad=True)
    model = model.double()
    model.blocks[0].attn.W_Q.requires_grad_(False)  # a user's frozen weight stays frozen
    flags = [q.requires_grad for q in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = Metric("custom", lambda lg, b, c: loss(lg, b, c) ** 2) if metric == "custom" else metric
    data = EdgeData(model, batches, "mean")
    fast = eap(model, data, metric=m, fast=True)
    slow = eap(model, data, metric=m, fast=False)
    assert torch.allclose(fast.per_example, slow.per_example, atol=1e-9, rtol=1e-7)
    assert fast.per_example.abs().max() > 1e-4
    assert [q.requires_grad for q in model.parameters()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(mod._forward_hooks for mod in model.modules())


@pytest.mark.parametrize(
    "mlp,norm,split",
    [(True, True, True), (False, True, False), (True, False, True), (False, False, True)],
)
@pytest.mark.parametrize("source", ["mean", Source("counterfactual")])
def test_circuit_metric_equals_the_masked_forward(mlp, norm, split, source):
    from meanablate.discovery.edge_circuit import circuit_metric

    model, batches = _setup(mlp=mlp, norm=norm, seed=12, pad=True)
    model = model.double()
    data = EdgeData(model, batches, source, split_qkv=split)
    gen = torch.Generator().manual_seed(1)
    loss = get_metric("loss")
    for frac in (0.0, 0.05, 0.3, 0.8, 1.0):
        kept = torch.rand(len(data.graph), generator=gen) < frac
        got = circuit_metric(data, kept, loss)
        want = data.metric_of((~kept).double(), loss)
        assert got is not None and torch.allclose(got, want, atol=1e-12, rtol=1e-12)
    assert circuit_metric(data, kept, get_metric("accuracy")) is None  # discrete: exact path


@pytest.mark.parametrize("seed", [8, 9, 13])
def test_attribute_verify_keeps_its_promises(seed):
    from meanablate.discovery.edge_prune import VERIFY_PAST, discover_edges

    model, batches = _setup(seed=seed)
    kw = {"metric": "loss", "target_faithfulness": 0.8}
    sweep = discover_edges(model, EdgeData(model, batches, "zero"), algorithm="sweep", **kw)
    data = EdgeData(model, batches, "zero")
    av = discover_edges(model, data, algorithm="attribute_verify", **kw)
    names = av.units
    exact = dict(zip(names, av.unit_scores.exact.tolist()))
    # every kept edge measured exactly, the faithfulness reached and evaluated exactly
    assert av.faithfulness >= 0.8 and all(exact[u] for u in av.kept)
    mask = edge_mask(data.graph, [u for u in names if u not in set(av.kept)])
    assert float(data.metric_of(mask, "loss").mean()) == pytest.approx(av.metric_circuit, abs=1e-6)
    # the verified edges reach VERIFY_PAST past the circuit's lowest-ranked edge by EAP
    from meanablate.discovery.eap import eap

    order = eap(model, data, metric="loss").ranking()
    reach = max(order.index(u) + 1 for u in av.kept)
    assert sum(exact.values()) >= min(len(names), reach + VERIFY_PAST)
    assert all(exact[u] for u in order[: min(len(names), reach + VERIFY_PAST)])
    # where the exact ranking's top, as far as the search looked, was all verified, the
    # circuit is the sweep's
    looked = max(size for size, _ in sweep.curve)
    if all(exact[u] for u in sweep.unit_scores.ranking()[:looked]):
        assert sorted(av.kept) == sorted(sweep.kept)
    # verifying everything is the sweep itself
    full = discover_edges(
        model, EdgeData(model, batches, "zero"), algorithm="attribute_verify",
        verify_top=len(names), **kw,
    )  # fmt: skip
    assert sorted(full.kept) == sorted(sweep.kept)


@pytest.mark.parametrize("source", ["mean", Source("counterfactual")])
def test_edge_sweep_with_a_discrete_metric_is_the_masked_forward_bit_for_bit(source, monkeypatch):
    # accuracy reads an argmax: the shortcuts equal the masked forward only to float error,
    # which can flip a tie, so a discrete metric takes the masked forward for every edge
    import importlib

    module = importlib.import_module("meanablate.discovery.edge_sweep")

    def refuse(*args, **kwargs):
        raise AssertionError("a discrete metric took a float-error shortcut")

    monkeypatch.setattr(module, "_sweep_item", refuse)
    monkeypatch.setattr(module, "_sweep_item_heads", refuse)
    model, batches = _setup(pad=True)
    data = EdgeData(model, batches, source)
    got = edge_sweep(model, data, metric="accuracy")
    want = _one_by_one(data, "accuracy")
    assert torch.equal(got.per_example, want)
    assert want.abs().max() > 0  # some edge flips a prediction
