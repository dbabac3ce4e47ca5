"""meanablate on a TransformerLens 4 ``TransformerBridge`` against TransformerLens itself.

Two bridges, built offline: over a random HF GPT-2 (``bridge_from_hf_gpt2``) and over our
transformer (``to_transformer_bridge``: TL's ``NativeModel``). The reference for every
number is written in TL's own API: means from ``run_with_cache``, ablations as hook
functions on TL's shapes (``hook_z [batch, pos, head, d_head]``) run by
``bridge.run_with_hooks``. Continuous metrics agree to 1e-6, accuracy exactly.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens.model_bridge")
transformers = pytest.importorskip("transformers")

from meanablate import (  # noqa: E402
    ablate,
    ablation_effect,
    attribute,
    capture,
    compute_means,
    discover,
    sweep,
    transformer_units,
)
from meanablate.adapters import transformer_lens as tla  # noqa: E402
from meanablate.discovery import ALGORITHMS, SetMetric  # noqa: E402
from meanablate.families import family_of  # noqa: E402
from meanablate.metrics import get_metric  # noqa: E402
from meanablate.organisms.transformer import HookedTransformer, TransformerConfig  # noqa: E402
from meanablate.sites import parse_site  # noqa: E402

VOCAB, N_POS, BATCH = 23, 8, 6
METRICS = ("kl", "logit_diff", "loss", "accuracy")
UNITS = [
    "blocks.0.attn.hook_z[heads=1]",
    "blocks.1.attn.hook_z[heads=3]",
    "blocks.0.mlp.hook_post[neurons=5]",
    "blocks.1.mlp.hook_post[neurons=17]",
    "blocks.0.hook_mlp_out",
    "blocks.1.hook_resid_pre[pos=2]",
]


def _randomize(module: torch.nn.Module, std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def hf_bridge():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=64,
        activation_function="gelu_new",
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    _randomize(hf, 0.3, seed=1)
    return tla.bridge_from_hf_gpt2(hf)


def llama_bridge():
    """Llama-style: RMSNorm, rotary, gated MLP, grouped-query attention (2 key/value heads)."""
    import copy

    from transformer_lens.model_bridge.sources import build_bridge_from_module

    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    _randomize(hf, 0.3, seed=3)
    module = copy.deepcopy(hf).eval()
    br = build_bridge_from_module(
        module, "LlamaForCausalLM", hf_config=module.config, model_name="llama-local"
    )
    return br.eval()


def ours(seed: int = 2) -> HookedTransformer:
    cfg = TransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_vocab=VOCAB,
        n_ctx=16,
        d_mlp=64,
        act_fn="gelu",
        normalization="LN",
    )  # type: ignore[arg-type]
    model = HookedTransformer(cfg).eval()
    _randomize(model, 0.3, seed=seed)
    return model


def native_bridge():
    return tla.to_transformer_bridge(ours())


BRIDGES = {"hf_gpt2": hf_bridge, "native": native_bridge, "hf_llama": llama_bridge}


@pytest.fixture(scope="module", params=sorted(BRIDGES))
def bridge(request):
    br = BRIDGES[request.param]()
    with torch.no_grad():  # the bridge sets up state of its own on a first forward
        br(torch.zeros(1, 2, dtype=torch.long))
    return br


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, N_POS), generator=gen)
    target = torch.full((BATCH, N_POS), -100)
    target[:, -3:] = torch.randint(0, VOCAB, (BATCH, 3), generator=gen)
    wrong = torch.randint(0, VOCAB, (BATCH, N_POS), generator=gen)
    return {"tokens": tokens, "target": target, "wrong": wrong}


BATCHES = [make_batch(10), make_batch(11)]
SOURCE = make_batch(12)
# for resample in sweep/SetMetric: each batch carries its counterfactual twin's tokens
CORRUPTED = [dict(b, corrupt=BATCHES[(i + 1) % 2]["tokens"]) for i, b in enumerate(BATCHES)]


def _batches_and_sources(method: str) -> tuple[list[dict], list[dict | None]]:
    """The batches a method is scored on, and the input each one's resampled values come from."""
    if method != "resample":
        return BATCHES, [None] * len(BATCHES)
    return CORRUPTED, [{"tokens": b["corrupt"]} for b in CORRUPTED]


# -- the reference, in TransformerLens's own API ------------------------------------------
def tl_means(br, names: list[str], batches) -> dict[str, torch.Tensor]:
    """Dataset means from ``run_with_cache``: float64 over every example and position."""
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with torch.no_grad():
        for b in batches:
            _, cache = br.run_with_cache(b["tokens"], names_filter=names)
            for n in names:
                acts[n].append(cache[n])
    return {n: torch.cat(a).double().flatten(0, 1).mean(0) for n, a in acts.items()}


def _index(unit: str) -> tuple:
    site = parse_site(unit)
    if site.heads is not None:  # TL's hook_z: [batch, pos, head, d_head]
        return (slice(None), slice(None), list(site.heads))
    if site.neurons is not None:
        return (Ellipsis, list(site.neurons))
    if site.positions is not None:
        return (slice(None), list(site.positions))
    return (Ellipsis,)


def tl_hooks(br, units, method, means, source=None):
    """``fwd_hooks`` for ``run_with_hooks``: TL hook functions replacing each unit."""
    src = {}
    if method == "resample":
        names = sorted({parse_site(u).module for u in units})
        with torch.no_grad():
            _, cache = br.run_with_cache(source["tokens"], names_filter=names)
        src = {n: cache[n] for n in names}
    hooks = []
    for unit in units:
        name, idx = parse_site(unit).module, _index(unit)

        def fn(act, hook, name=name, idx=idx):
            if method == "mean":
                fill = means[name].to(act.dtype).expand_as(act)
            elif method == "zero":
                fill = torch.zeros_like(act)
            else:
                fill = src[name]
            act = act.clone()
            act[idx] = fill[idx]
            return act

        hooks.append((name, fn))
    return hooks


def tl_logits(br, batch, units, method, means, source=None) -> torch.Tensor:
    with torch.no_grad():
        return br.run_with_hooks(
            batch["tokens"], fwd_hooks=tl_hooks(br, units, method, means, source)
        )


def tl_effect(br, batch, units, method, means, metric, source=None) -> torch.Tensor:
    with torch.no_grad():
        clean = br(batch["tokens"])
    ablated = tl_logits(br, batch, units, method, means, source)
    return get_metric(metric).effect(ablated, batch, clean)


def assert_matches(got: torch.Tensor, want: torch.Tensor, metric: str, what: str) -> None:
    got, want = got.double(), want.double()
    if metric == "accuracy":
        assert torch.equal(got, want), f"{what}: {got} != {want}"
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=what)


def module_state(model: torch.nn.Module) -> dict:
    """Every module's attribute names and hooks (TL's hook lists included)."""
    out = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        hooks = {
            k: tuple(v)
            for k, v in vars(mod).items()
            if k.endswith("_hooks") and isinstance(v, dict)
        }
        tl = tuple(id(h) for h in getattr(mod, "fwd_hooks", []) + getattr(mod, "bwd_hooks", []))
        out[name] = (tuple(sorted(vars(mod))), hooks, tl)
    return out


# -- tests ---------------------------------------------------------------------------------
def test_torch_hooks_see_tl_shapes_and_replace_as_run_with_hooks(bridge) -> None:
    keys = [
        "blocks.0.attn.hook_z",
        "blocks.0.attn.hook_pattern",
        "blocks.1.attn.hook_q",
        "blocks.0.mlp.hook_post",
        "blocks.1.hook_resid_pre",
    ]
    tokens = BATCHES[0]["tokens"]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=keys)
        with capture(bridge, keys) as store:
            bridge(tokens)
    for k in keys:
        assert store[k].shape == cache[k].shape, k
        assert torch.equal(store[k], cache[k]), k
    assert store["blocks.0.attn.hook_z"].shape == (BATCH, N_POS, 4, 8)
    # a stateful conversion (TL keys AttentionAutoConversion's state by tensor id) is left
    # as it was: our hooks drop the state their own calls added
    conv = bridge.hook_dict["blocks.0.hook_attn_out"].hook_conversion
    n_states = len(conv._conversion_state)
    with torch.no_grad(), capture(bridge, ["blocks.0.hook_attn_out"]) as out:
        bridge(tokens)
    assert len(conv._conversion_state) == n_states
    assert out["blocks.0.hook_attn_out"].shape == (BATCH, N_POS, 32)
    assert store["blocks.0.attn.hook_pattern"].shape == (BATCH, 4, N_POS, N_POS)


@pytest.mark.parametrize("per_position", [False, True])
def test_means_equal_run_with_cache(bridge, per_position: bool) -> None:
    names = sorted({parse_site(u).module for u in UNITS})
    means = compute_means(bridge, UNITS, BATCHES, per_position=per_position)
    if per_position:
        acts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        with torch.no_grad():
            for b in BATCHES:
                _, cache = bridge.run_with_cache(b["tokens"], names_filter=names)
                for n in names:
                    acts[n].append(cache[n])
        want = {n: torch.cat(a).double().mean(0) for n, a in acts.items()}
    else:
        want = tl_means(bridge, names, BATCHES)
    for n in names:
        torch.testing.assert_close(means[n], want[n], rtol=1e-10, atol=1e-12, msg=n)
    assert means["blocks.0.attn.hook_z"].shape[-2:] == (4, 8)  # heads kept apart


@pytest.mark.parametrize("method", ["mean", "zero", "resample"])
def test_ablation_effect_equals_run_with_hooks(bridge, method: str) -> None:
    names = sorted({parse_site(u).module for u in UNITS})
    means = compute_means(bridge, UNITS, BATCHES)
    ref_means = tl_means(bridge, names, BATCHES)
    batch = BATCHES[0]
    moved = 0.0
    for unit in UNITS:
        want_logits = tl_logits(bridge, batch, [unit], method, ref_means, SOURCE)
        with torch.no_grad(), ablate(bridge, unit, means, method=method, source=SOURCE):
            got_logits = bridge(batch["tokens"])
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-6, atol=1e-6, msg=unit)
        with torch.no_grad():
            moved = max(moved, float((want_logits - bridge(batch["tokens"])).abs().max()))
        for metric in METRICS:
            got = ablation_effect(
                bridge, batch, unit, means, metric=metric, method=method, source=SOURCE
            ).per_example
            want = tl_effect(bridge, batch, [unit], method, ref_means, metric, SOURCE)
            assert_matches(got, want, metric, f"{unit} {metric} {method}")
    assert moved > 0.1  # the ablations change the logits: the comparison is not vacuous


@pytest.mark.parametrize("method", ["mean", "zero", "resample"])
@pytest.mark.parametrize("fast", [True, False])
def test_sweep_equals_run_with_hooks(bridge, method: str, fast: bool) -> None:
    names = sorted({parse_site(u).module for u in UNITS})
    means = compute_means(bridge, UNITS, BATCHES) if method == "mean" else None
    ref_means = tl_means(bridge, names, BATCHES)
    batches, sources = _batches_and_sources(method)
    before = module_state(bridge)
    for metric in METRICS:
        scores = sweep(bridge, batches, UNITS, means, metric=metric, method=method, fast=fast)
        for i, unit in enumerate(UNITS):
            want = torch.cat(
                [
                    tl_effect(bridge, b, [unit], method, ref_means, metric, s)
                    for b, s in zip(batches, sources)
                ]
            )
            assert_matches(scores.per_example[i], want, metric, f"{unit} {metric}")
        if metric == "kl":  # the ablations move the output: the comparison can fail
            assert float(scores.values.max()) > 1e-4, scores.values
    assert module_state(bridge) == before


@pytest.mark.parametrize("method", ["mean", "zero", "resample"])
def test_set_metric_equals_run_with_hooks(bridge, method: str) -> None:
    names = sorted({parse_site(u).module for u in UNITS})
    means = compute_means(bridge, UNITS, BATCHES) if method == "mean" else None
    ref_means = tl_means(bridge, names, BATCHES)
    batches, sources = _batches_and_sources(method)
    sets = [[], UNITS[:2], UNITS[1:4], [UNITS[0], UNITS[4], UNITS[5]], UNITS]
    for metric in METRICS:
        sm = SetMetric(bridge, batches, UNITS, means, metric, method=method)
        m = get_metric(metric)
        for chosen in sets:
            want = []
            for b, s in zip(batches, sources):
                with torch.no_grad():
                    clean = bridge(b["tokens"])
                logits = tl_logits(bridge, b, chosen, method, ref_means, s) if chosen else clean
                want.append(m(logits, b, clean))
            assert_matches(sm(chosen), torch.cat(want), metric, f"{chosen} {metric}")


def test_accuracy_exact_at_a_constructed_tie() -> None:
    # Two vocabulary entries with zero unembedding columns and the same large bias: their
    # logits are exactly equal (and on top) in every run, so argmax takes the first one.
    model = ours(seed=5)
    with torch.no_grad():
        model.W_U[:, [3, 7]] = 0.0
        model.b_U.zero_()
        model.b_U[[3, 7]] = 50.0
    br = tla.to_transformer_bridge(model)
    batch = make_batch(20)
    batch["target"][:, -3:] = torch.tensor([3, 7, 3])
    units = ["blocks.0.attn.hook_z[heads=0]", "blocks.1.hook_mlp_out"]
    means = compute_means(br, units, [batch])
    ref_means = tl_means(br, sorted({parse_site(u).module for u in units}), [batch])
    m = get_metric("accuracy")
    with torch.no_grad():
        clean = br(batch["tokens"])
    assert torch.equal(clean[..., 3], clean[..., 7])
    assert torch.equal(m(clean, batch, clean), torch.full((BATCH,), 2 / 3, dtype=torch.float64))
    scores = sweep(br, [batch], units, means, metric="accuracy")
    sm = SetMetric(br, [batch], units, means, "accuracy")
    for i, unit in enumerate(units):
        want = tl_effect(br, batch, [unit], "mean", ref_means, "accuracy")
        assert torch.equal(scores.per_example[i], want.double())
        ablated = tl_logits(br, batch, [unit], "mean", ref_means)
        assert torch.equal(sm([unit]), m(ablated, batch, clean).double())


def test_units_and_site_checks(bridge) -> None:
    fam = family_of(bridge)
    assert fam.name == "tl_bridge"
    assert fam.units("heads") == transformer_units(bridge, "heads")
    assert len(fam.units("heads")) == 8
    assert fam.units("mlps") == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert len(fam.units("neurons", layers=[1])) == 64
    assert fam.units("positions", layers=[0], n_positions=3) == [
        f"blocks.0.hook_resid_pre[pos={p}]" for p in range(3)
    ]
    info = fam.unit_info(parse_site("blocks.1.attn.hook_z[heads=2]"))
    assert (info.layer, info.kind, info.heads.n_heads, info.heads.d_head) == (1, "head", 4, 8)
    assert fam.unit_info(parse_site("blocks.0.mlp.hook_post[neurons=1]")).kind == "neuron"
    n_kv = bridge.cfg.n_key_value_heads or 4  # hook_k/v carry the key/value heads
    assert fam.unit_info(parse_site("blocks.0.attn.hook_k[heads=0]")).heads.n_heads == n_kv
    with pytest.raises(IndexError, match="out of range"):
        fam.check_site(parse_site(f"blocks.0.attn.hook_v[heads={n_kv}]"))
    tokens = BATCHES[0]["tokens"]
    bad = {
        "blocks.0.hook_mlp_out[heads=0]": (ValueError, "no head axis"),
        "blocks.0.attn.hook_z[heads=4]": (IndexError, "out of range"),
        "blocks.0.attn.hook_z[heads=1;n_heads=4]": (ValueError, "drop n_heads"),
        "blocks.0.attn.hook_pattern[heads=1]": (ValueError, "head, query, key"),
        "blocks.0.attn.hook_result": (ValueError, "use_attn_result"),
    }
    for site, (exc, msg) in bad.items():
        with pytest.raises(exc, match=msg), ablate(bridge, site, method="zero"):
            bridge(tokens)
        if "result" not in site:
            with pytest.raises(exc, match=msg):
                sweep(bridge, [tokens], [site], None, method="zero")


def test_tail_gives_the_logits(bridge) -> None:
    tokens = BATCHES[0]["tokens"]
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post"])
        tail = family_of(bridge).tail(cache["blocks.1.hook_resid_post"])
    torch.testing.assert_close(tail, logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("metric", ["loss", "logit_diff"])
def test_attribute_equals_tl_gradients(bridge, metric: str) -> None:
    names = sorted({parse_site(u).module for u in UNITS})
    means = compute_means(bridge, UNITS, BATCHES)
    ref_means = tl_means(bridge, names, BATCHES)
    scores = attribute(bridge, BATCHES, UNITS, means, metric=metric)
    m = get_metric(metric)
    for j, b in enumerate(BATCHES):
        acts, leaves = {}, {}

        def tap(act, hook, acts=acts, leaves=leaves):
            acts[hook.name] = act.detach()
            leaves[hook.name] = torch.zeros_like(act, requires_grad=True)
            return act + leaves[hook.name]

        with torch.enable_grad():
            out = bridge.run_with_hooks(b["tokens"], fwd_hooks=[(n, tap) for n in names])
            m(out, b, out.detach()).sum().backward()
        canon = {bridge.hook_dict[n].name: n for n in names}  # TL reports canonical names
        for i, unit in enumerate(UNITS):
            name = parse_site(unit).module
            key = next(k for k, v in canon.items() if v == name)
            act, grad = acts[key], leaves[key].grad
            prod = (ref_means[name].to(act.dtype).expand_as(act) - act).double() * grad.double()
            keep = torch.zeros_like(prod, dtype=torch.bool)
            keep[_index(unit)] = True
            want = torch.where(keep, prod, 0.0).flatten(1).sum(1)
            got = scores.per_example[i, j * BATCH : (j + 1) * BATCH]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=unit)
        assert scores.per_example.abs().max() > 1e-4


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_discover_finds_a_circuit_and_leaves_no_trace(bridge, algorithm: str) -> None:
    means = compute_means(bridge, UNITS, BATCHES)
    before = module_state(bridge)
    kwargs = {"threshold": 1e-3} if algorithm == "acdc" else {"target_faithfulness": 0.9}
    circuit = discover(
        bridge, BATCHES, means, units=UNITS, metric="kl", algorithm=algorithm, **kwargs
    )
    assert module_state(bridge) == before
    assert circuit.kept, algorithm
    assert circuit.metric_empty > 1e-3  # ablating everything moves the output
    # the circuit's metric is that of TL's run with every other unit ablated
    ref_means = tl_means(bridge, sorted({parse_site(u).module for u in UNITS}), BATCHES)
    rest = [u for u in UNITS if u not in circuit.kept]
    want = torch.cat([tl_effect(bridge, b, rest, "mean", ref_means, "kl") for b in BATCHES])
    assert abs(float(want.mean()) - circuit.metric_circuit) < 1e-6


def test_sweep_resumes_from_the_units_block(bridge, monkeypatch) -> None:
    from meanablate.discovery import layerskip

    fam = family_of(bridge)
    assert fam.can_resume()
    resumed: list[int] = []
    run_from = layerskip.run_from

    def spy(family, calls, layer, **kwargs):
        resumed.append(layer)
        return run_from(family, calls, layer, **kwargs)

    monkeypatch.setattr(layerskip, "run_from", spy)
    means = compute_means(bridge, UNITS, BATCHES)
    ref_means = tl_means(bridge, sorted({parse_site(u).module for u in UNITS}), BATCHES)
    later = [u for u in UNITS if u.startswith("blocks.1.")]
    scores = sweep(bridge, BATCHES, later, means, metric="accuracy")
    assert resumed and set(resumed) == {1}  # blocks 0.. were not re-run
    for i, unit in enumerate(later):
        want = torch.cat(
            [tl_effect(bridge, b, [unit], "mean", ref_means, "accuracy") for b in BATCHES]
        )
        assert torch.equal(scores.per_example[i], want.double())
    # a hook of the user's (TL's add_hook here) is never bypassed: then no resuming
    resumed.clear()
    bridge.add_hook("blocks.0.hook_resid_pre", lambda act, hook: None)
    try:
        sweep(bridge, BATCHES, later, means, metric="accuracy")
    finally:
        bridge.reset_hooks()
    assert resumed == []


def test_resample_sweep_runs_the_corrupted_input_once_per_batch(bridge, monkeypatch) -> None:
    """One corrupted forward per batch captures every unit's counterfactual (``fast=False``:
    one per unit, which shows the count can fail)."""
    import functools

    batches = [dict(b, corrupt=(b["tokens"] + 1) % VOCAB) for b in BATCHES]
    calls: list[str] = []
    cls = type(bridge)
    forward = cls.forward

    @functools.wraps(forward)  # run_model reads the signature
    def spy(self, *args, **kwargs):
        ids = kwargs.get("input", args[0] if args else None)
        hit = any(isinstance(ids, torch.Tensor) and torch.equal(ids, b["corrupt"]) for b in batches)
        calls.append("corrupt" if hit else "clean")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", spy)
    for fast in (True, False):
        calls.clear()
        sweep(bridge, batches, UNITS, None, metric="kl", method="resample", fast=fast)
        per_unit = 1 if fast else len(UNITS)
        assert calls.count("corrupt") == per_unit * len(batches), (fast, calls)
