"""meanablate on nnsight-wrapped models against nnsight's own traces.

``NNsight(model)`` (and ``LanguageModel``) instrument every module of the model they
wrap. meanablate unwraps them and hooks the wrapped module, so: every number equals an
nnsight trace doing the replacement (``with model.trace(tokens): ...output[..., i] =
mean``), continuous metrics to 1e-6 and accuracy exactly; and wrapping before or after
a meanablate call changes nothing (no attribute or hook left on any module).
"""

from __future__ import annotations

import warnings

import pytest
import torch

nnsight = pytest.importorskip("nnsight")
transformers = pytest.importorskip("transformers")

from meanablate import (  # noqa: E402
    ablation_effect,
    attribute,
    compute_means,
    discover,
    sweep,
    transformer_units,
)
from meanablate.discovery import SetMetric  # noqa: E402
from meanablate.families import family_of, unwrap  # noqa: E402
from meanablate.metrics import get_metric  # noqa: E402
from meanablate.organisms.transformer import HookedTransformer, TransformerConfig  # noqa: E402
from meanablate.sites import parse_site  # noqa: E402

VOCAB, N_POS, BATCH, D_HEAD = 23, 8, 6, 8
METRICS = ("kl", "logit_diff", "loss", "accuracy")
# HF GPT-2 units as transformer_units names them, in forward order (an nnsight trace
# must touch modules in the order they run)
HF_UNITS = [
    "transformer.h.0.attn.c_proj@input[heads=1]",
    "transformer.h.0.mlp.act[neurons=5]",
    "transformer.h.0.mlp",
    "transformer.h.1@input[pos=2]",
    "transformer.h.1.attn.c_proj@input[heads=3]",
    "transformer.h.1.mlp.act[neurons=17]",
]
OURS_UNITS = [
    "blocks.0.attn.hook_z[heads=1]",
    "blocks.0.mlp.hook_post[neurons=5]",
    "blocks.0.hook_mlp_out",
    "blocks.1.hook_resid_pre[pos=2]",
    "blocks.1.attn.hook_z[heads=3]",
]


def _randomize(module: torch.nn.Module, std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def gpt2() -> torch.nn.Module:
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
    model = transformers.GPT2LMHeadModel(cfg).eval()
    _randomize(model, 0.3, seed=1)
    return model


def ours(seed: int = 2) -> HookedTransformer:
    cfg = TransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=D_HEAD,
        d_vocab=VOCAB,
        n_ctx=16,
        d_mlp=64,
        act_fn="gelu",
        normalization="LN",
    )  # type: ignore[arg-type]
    model = HookedTransformer(cfg).eval()
    _randomize(model, 0.3, seed=seed)
    return model


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


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


# -- the reference, written as nnsight traces ---------------------------------------------
def envoy_at(wrapper, path: str):
    env = wrapper
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def _index(unit: str) -> tuple:
    site = parse_site(unit)
    if site.heads is not None:
        if site.io == "input":  # HF's c_proj input: flat [batch, pos, n_heads * d_head]
            cols = [h * D_HEAD + j for h in site.heads for j in range(D_HEAD)]
            return (Ellipsis, cols)
        return (slice(None), slice(None), list(site.heads))  # ours: [b, p, head, d_head]
    if site.neurons is not None:
        return (Ellipsis, list(site.neurons))
    if site.positions is not None:
        return (slice(None), list(site.positions))
    return (Ellipsis,)


def nn_acts(wrapper, units, tokens) -> dict[str, torch.Tensor]:
    """The activation of each unit's site on ``tokens``, read in one trace."""
    saved = {}
    with torch.no_grad(), wrapper.trace(tokens):
        for key in dict.fromkeys(parse_site(u).key for u in units):
            site = parse_site(key)
            env = envoy_at(wrapper, site.module)
            act = env.input if site.io == "input" else env.output
            saved[key] = act.save()
    return {k: v.detach().clone() for k, v in saved.items()}


def nn_means(wrapper, units, batches) -> dict[str, torch.Tensor]:
    acts: dict[str, list[torch.Tensor]] = {}
    for b in batches:
        for k, v in nn_acts(wrapper, units, b["tokens"]).items():
            acts.setdefault(k, []).append(v)
    return {k: torch.cat(v).double().flatten(0, 1).mean(0) for k, v in acts.items()}


def nn_logits(wrapper, tokens, units, method, means, source=None) -> torch.Tensor:
    """One trace with every unit replaced in place (units in forward order)."""
    src = nn_acts(wrapper, units, source["tokens"]) if method == "resample" else {}
    with torch.no_grad(), wrapper.trace(tokens):
        for unit in units:
            site = parse_site(unit)
            env = envoy_at(wrapper, site.module)
            act = env.input if site.io == "input" else env.output
            idx = _index(unit)
            if method == "mean":
                act[idx] = means[site.key].to(act.dtype).expand(act.shape)[idx]
            elif method == "zero":
                act[idx] = 0.0
            else:
                act[idx] = src[site.key][idx]
        out = wrapper.output.save()
    return logits_of(out).detach().clone()


def nn_effect(wrapper, batch, units, method, means, metric, source=None) -> torch.Tensor:
    with torch.no_grad(), wrapper.trace(batch["tokens"]):
        clean = wrapper.output.save()
    ablated = nn_logits(wrapper, batch["tokens"], units, method, means, source)
    return get_metric(metric).effect(ablated, batch, logits_of(clean))


def assert_matches(got: torch.Tensor, want: torch.Tensor, metric: str, what: str) -> None:
    got, want = got.double(), want.double()
    if metric == "accuracy":
        assert torch.equal(got, want), f"{what}: {got} != {want}"
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=what)


def module_state(model: torch.nn.Module) -> dict:
    """Every module's attribute names and hooks."""
    out = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        hooks = {
            k: tuple(v) for k, v in vars(mod).items() if k.endswith("hooks") and isinstance(v, dict)
        }
        out[name] = (tuple(sorted(vars(mod))), hooks)
    return out


MODELS = {"hf_gpt2": (gpt2, HF_UNITS), "ours": (ours, OURS_UNITS)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def wrapped(request):
    build, units = MODELS[request.param]
    return nnsight.NNsight(build()), units


# -- tests ---------------------------------------------------------------------------------
def test_unwrap_gives_the_wrapped_module() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf = gpt2()
    assert unwrap(nnsight.NNsight(hf)) is hf
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w0")
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # LanguageModel is deprecated in favour of TransformersModel
        lm = nnsight.LanguageModel(hf, tokenizer=tok)
    assert unwrap(lm) is hf
    assert family_of(lm).name == "hf_gpt2"
    assert transformer_units(lm, "heads") == transformer_units(hf, "heads")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        unwrap(object())


def test_means_equal_an_nnsight_trace(wrapped) -> None:
    w, units = wrapped
    means = compute_means(w, units, BATCHES)
    want = nn_means(w, units, BATCHES)
    for key, ref in want.items():
        torch.testing.assert_close(means[key].reshape(ref.shape), ref, rtol=1e-10, atol=1e-12)
    assert means.metadata["model_class"] == type(unwrap(w)).__name__


@pytest.mark.parametrize("method", ["mean", "zero", "resample"])
def test_ablation_effect_equals_an_nnsight_trace(wrapped, method: str) -> None:
    w, units = wrapped
    means = compute_means(w, units, BATCHES)
    ref_means = {k: v.reshape(means[k].shape) for k, v in nn_means(w, units, BATCHES).items()}
    batch = BATCHES[0]
    for unit in units:
        for metric in METRICS:
            got = ablation_effect(
                w, batch, unit, means, metric=metric, method=method, source=SOURCE
            ).per_example
            want = nn_effect(w, batch, [unit], method, ref_means, metric, SOURCE)
            assert_matches(got, want, metric, f"{unit} {metric} {method}")
    kl = nn_effect(w, batch, units[:1], method, ref_means, "kl", SOURCE)
    assert float(kl.max()) > 1e-4  # the ablation moves the output: not a vacuous check


@pytest.mark.parametrize("method", ["mean", "zero", "resample"])
def test_sweep_and_set_metric_equal_an_nnsight_trace(wrapped, method: str) -> None:
    w, units = wrapped
    means = compute_means(w, units, BATCHES)
    ref_means = {k: v.reshape(means[k].shape) for k, v in nn_means(w, units, BATCHES).items()}
    batches, sources = BATCHES, [None] * len(BATCHES)
    if method == "resample":  # each example's corrupted twin supplies the values (no means)
        batches, means = CORRUPTED, None
        sources = [{"tokens": b["corrupt"]} for b in CORRUPTED]
    sets = [units[:2], [units[0], units[3]], units]
    for metric in METRICS:
        m = get_metric(metric)
        for fast in (True, False):
            scores = sweep(w, batches, units, means, metric=metric, method=method, fast=fast)
            for i, unit in enumerate(units):
                want = torch.cat(
                    [
                        nn_effect(w, b, [unit], method, ref_means, metric, s)
                        for b, s in zip(batches, sources)
                    ]
                )
                assert_matches(scores.per_example[i], want, metric, f"{unit} {metric} {fast}")
            if metric == "kl":  # the ablations move the output: the comparison can fail
                assert float(scores.values.max()) > 1e-4, scores.values
        sm = SetMetric(w, batches, units, means, metric, method=method)
        for chosen in sets:
            want = []
            for b, s in zip(batches, sources):
                clean = nn_logits(w, b["tokens"], [], method, ref_means, s)
                want.append(m(nn_logits(w, b["tokens"], chosen, method, ref_means, s), b, clean))
            assert_matches(sm(chosen), torch.cat(want), metric, f"{chosen} {metric}")


def test_accuracy_exact_at_a_constructed_tie() -> None:
    # Two classes with zero unembedding columns and the same large bias: exactly tied
    # and on top in every run, so argmax takes the first (class 3).
    model = ours(seed=5)
    with torch.no_grad():
        model.W_U[:, [3, 7]] = 0.0
        model.b_U.zero_()
        model.b_U[[3, 7]] = 50.0
    w = nnsight.NNsight(model)
    batch = make_batch(20)
    batch["target"][:, -3:] = torch.tensor([3, 7, 3])
    units = OURS_UNITS[:3]
    means = compute_means(w, units, [batch])
    ref_means = {k: v.reshape(means[k].shape) for k, v in nn_means(w, units, [batch]).items()}
    m = get_metric("accuracy")
    clean = nn_logits(w, batch["tokens"], [], "mean", ref_means)
    assert torch.equal(clean[..., 3], clean[..., 7])
    assert torch.equal(m(clean, batch, clean), torch.full((BATCH,), 2 / 3, dtype=torch.float64))
    scores = sweep(w, [batch], units, means, metric="accuracy")
    sm = SetMetric(w, [batch], units, means, "accuracy")
    for i, unit in enumerate(units):
        ablated = nn_logits(w, batch["tokens"], [unit], "mean", ref_means)
        want = m(ablated, batch, clean).double() - m(clean, batch, clean).double()
        assert torch.equal(scores.per_example[i], want)
        assert torch.equal(sm([unit]), m(ablated, batch, clean).double())


def _everything(model, units) -> dict[str, torch.Tensor]:
    """Every public computation once: means, effect, sweeps, attribution, discovery."""
    means = compute_means(model, units, BATCHES)
    out = {f"means {k}": means[k] for k in sorted(means.keys())}
    out["effect"] = ablation_effect(model, BATCHES[0], units[1], means, metric="kl").per_example
    for fast in (True, False):
        out[f"sweep {fast}"] = sweep(
            model, BATCHES, units, means, metric="loss", fast=fast
        ).per_example
    out["attribute"] = attribute(model, BATCHES, units, means, metric="loss").per_example
    circuit = discover(model, BATCHES, means, units=units, metric="kl", threshold=0.05)
    out["circuit"] = torch.tensor([u in circuit.kept for u in units])
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_wrapping_before_or_after_changes_nothing(name: str) -> None:
    build, units = MODELS[name]
    raw = build()
    state = module_state(raw)
    plain = _everything(raw, units)
    assert module_state(raw) == state  # nothing left on any module
    w = nnsight.NNsight(raw)  # wrapping after: instruments every module (nnsight's own)
    wrapped_state = module_state(raw)
    via_wrapper = _everything(w, units)
    raw_after = _everything(raw, units)
    assert module_state(raw) == wrapped_state
    for key, value in plain.items():
        assert torch.equal(via_wrapper[key], value), key
        assert torch.equal(raw_after[key], value), key
    # nnsight still traces the model as before meanablate ran
    tokens = BATCHES[0]["tokens"]
    with torch.no_grad(), w.trace(tokens):
        out = w.output.save()
    with torch.no_grad():
        assert torch.equal(logits_of(out), logits_of(raw(tokens)))
