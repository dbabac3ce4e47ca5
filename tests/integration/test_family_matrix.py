"""The differential matrix: every family x unit kind x metric x method against plain hooks.

For our transformer, Hugging Face GPT-2, GPT-NeoX, Llama and BERT, and a model of no
known family, meanablate's ``ablation_effect``, ``sweep`` (fast and not) and ``SetMetric``
(the set scoring behind ``discover``) must give what a reference written here with PLAIN
torch hooks gives (``register_forward_pre_hook`` / ``register_forward_hook`` doing the
replacement by hand, means averaged by hand over the real tokens, metrics written out):
exactly for accuracy, to 1e-6 for continuous metrics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import meanablate as ma
from meanablate.discovery import SetMetric
from meanablate.families import family_of
from meanablate.organisms.transformer import HookedTransformer, TransformerConfig

transformers = pytest.importorskip("transformers")

VOCAB, B, P = 40, 4, 6
METRICS = ("kl", "logit_diff", "loss", "accuracy")


# -- models -----------------------------------------------------------------------------------
class _Attn(nn.Module):
    """Attention written out, so the heads' concatenated output enters ``o`` as a module."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, p, d = x.shape
        q, k, v = self.qkv(x).view(b, p, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        z = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(z.transpose(1, 2).reshape(b, p, d))


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.attn = _Attn(d, 4)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mha(x, x, x, need_weights=False)[0]
        x = x + self.attn(x)
        return x + self.mlp(x)


class GenericLM(nn.Module):
    """A model of no known family: embeddings, two blocks, an unembedding."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList([_Block(d), _Block(d)])
        self.unembed = nn.Linear(d, VOCAB)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)


def _hf(name: str) -> nn.Module:
    t = transformers
    common = dict(vocab_size=VOCAB, initializer_range=0.3)
    if name == "gpt2":
        cfg = t.GPT2Config(n_layer=2, n_embd=16, n_head=4, n_positions=P, **common)
        return t.GPT2LMHeadModel(cfg)
    if name == "neox":
        cfg = t.GPTNeoXConfig(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=24,
            max_position_embeddings=P, **common,
        )  # fmt: skip
        return t.GPTNeoXForCausalLM(cfg)
    if name == "llama":
        cfg = t.LlamaConfig(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=24, max_position_embeddings=P, **common,
        )  # fmt: skip
        return t.LlamaForCausalLM(cfg)
    cfg = t.BertConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=24,
        max_position_embeddings=P, **common,
    )  # fmt: skip
    return t.BertForMaskedLM(cfg)


def _ours() -> nn.Module:
    cfg = TransformerConfig(
        n_layers=2, d_model=16, n_heads=4, d_head=4, d_vocab=VOCAB, n_ctx=P, d_mlp=24,
        normalization="LN",
    )  # fmt: skip
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model


# unit string -> (module path, "in"/"out", selection) written out by hand per family
Sel = tuple


@dataclass
class Case:
    build: Callable[[], nn.Module]
    units: dict[str, tuple[str, str, Sel]]
    ids_key: str = "input_ids"
    masked: bool = True  # the batches carry an attention_mask (with padding)


CASES = {
    "ours": Case(
        _ours,
        {
            "blocks.1.mlp.hook_post[neurons=3]": ("blocks.1.mlp.hook_post", "out", ("neuron", 3)),
            "blocks.0.attn.hook_z[heads=1]": ("blocks.0.attn.hook_z", "out", ("head", 1)),
            "blocks.0.hook_mlp_out": ("blocks.0.hook_mlp_out", "out", ("all",)),
            "blocks.1.hook_resid_pre[pos=2]": ("blocks.1.hook_resid_pre", "out", ("pos", 2)),
        },
        ids_key="tokens",
    ),
    "gpt2": Case(
        lambda: _hf("gpt2"),
        {
            "transformer.h.1.mlp.act[neurons=3]": ("transformer.h.1.mlp.act", "out", ("neuron", 3)),
            "transformer.h.0.attn.c_proj@input[heads=1]": (
                "transformer.h.0.attn.c_proj",
                "in",
                ("flat_head", 1, 4),
            ),
            "transformer.h.0.mlp": ("transformer.h.0.mlp", "out", ("all",)),
            "transformer.h.1@input[pos=2]": ("transformer.h.1", "in", ("pos", 2)),
            # written linearly into block 1's input: the sweep's linear path
            "transformer.h.0.mlp.act[neurons=5]": ("transformer.h.0.mlp.act", "out", ("neuron", 5)),
        },
    ),
    "neox": Case(
        lambda: _hf("neox"),
        {
            "gpt_neox.layers.1.mlp.dense_4h_to_h@input[neurons=3]": (
                "gpt_neox.layers.1.mlp.dense_4h_to_h",
                "in",
                ("neuron", 3),
            ),
            "gpt_neox.layers.0.attention.dense@input[heads=2]": (
                "gpt_neox.layers.0.attention.dense",
                "in",
                ("flat_head", 2, 4),
            ),
            "gpt_neox.layers.0.mlp": ("gpt_neox.layers.0.mlp", "out", ("all",)),
            "gpt_neox.layers.1@input[pos=2]": ("gpt_neox.layers.1", "in", ("pos", 2)),
        },
    ),
    "llama": Case(
        lambda: _hf("llama"),
        {
            "model.layers.1.mlp.down_proj@input[neurons=3]": (
                "model.layers.1.mlp.down_proj",
                "in",
                ("neuron", 3),
            ),
            "model.layers.0.self_attn.o_proj@input[heads=3]": (
                "model.layers.0.self_attn.o_proj",
                "in",
                ("flat_head", 3, 4),
            ),
            "model.layers.0.mlp": ("model.layers.0.mlp", "out", ("all",)),
            "model.layers.1@input[pos=2]": ("model.layers.1", "in", ("pos", 2)),
            "model.layers.0.mlp.down_proj@input[neurons=5]": (
                "model.layers.0.mlp.down_proj",
                "in",
                ("neuron", 5),
            ),
        },
    ),
    "bert": Case(
        lambda: _hf("bert"),
        {
            "bert.encoder.layer.1.intermediate[neurons=3]": (
                "bert.encoder.layer.1.intermediate",
                "out",
                ("neuron", 3),
            ),
            "bert.encoder.layer.0.attention.output.dense@input[heads=1]": (
                "bert.encoder.layer.0.attention.output.dense",
                "in",
                ("flat_head", 1, 4),
            ),
            "bert.encoder.layer.0.output.dense": (
                "bert.encoder.layer.0.output.dense",
                "out",
                ("all",),
            ),
            "bert.encoder.layer.1@input[pos=2]": ("bert.encoder.layer.1", "in", ("pos", 2)),
            # written linearly before layer 0's output LayerNorm: the sweep's "norm" path
            "bert.encoder.layer.0.intermediate[neurons=5]": (
                "bert.encoder.layer.0.intermediate",
                "out",
                ("neuron", 5),
            ),
        },
    ),
    "generic": Case(
        GenericLM,
        {
            "blocks.1.mlp.1[neurons=3]": ("blocks.1.mlp.1", "out", ("neuron", 3)),
            "blocks.0.attn.o@input[heads=1;n_heads=4]": (
                "blocks.0.attn.o",
                "in",
                ("flat_head", 1, 4),
            ),
            "blocks.0.mha": ("blocks.0.mha", "out", ("all",)),
            "blocks.1@input[pos=2]": ("blocks.1", "in", ("pos", 2)),
        },
        masked=False,
    ),
}


# -- data -------------------------------------------------------------------------------------
def _batch(case: Case, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, P), generator=gen)
    lengths = torch.tensor([P, P - 1, P, P - 2]) if case.masked else torch.full((B,), P)
    amask = (torch.arange(P)[None, :] < lengths[:, None]).long()
    target = torch.full((B, P), -100)
    wrong = torch.full((B, P), -100)
    rows = torch.arange(B)
    at = lengths - 1  # the last real token (a masked LM: any position; its mask here)
    target[rows, at] = torch.randint(0, VOCAB, (B,), generator=gen)
    wrong[rows, at] = (
        target[rows, at] + 1 + torch.randint(0, VOCAB - 1, (B,), generator=gen)
    ) % VOCAB
    batch = {case.ids_key: ids, "target": target, "wrong": wrong}
    if case.masked:
        batch["attention_mask"] = amask
    return batch


@cache
def _setup(name: str) -> tuple[nn.Module, list[dict], dict, Any]:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().eval()
    batches = [_batch(case, 1), _batch(case, 2)]
    source = _batch(case, 3)
    if case.masked:
        source["attention_mask"] = batches[0]["attention_mask"]
    keys = sorted({ma.parse_site(u).key for u in case.units})
    means = ma.compute_means(model, keys, batches)
    return model, batches, source, means


# -- the reference: plain torch hooks ----------------------------------------------------------
def _run(model: nn.Module, name: str, batch: dict) -> Tensor:
    case = CASES[name]
    with torch.no_grad():
        if name == "ours":
            return model(batch["tokens"], batch.get("attention_mask"))
        if name == "generic":
            return model(batch["input_ids"])
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    raise AssertionError(case)


def _capture(model: nn.Module, name: str, module: str, io: str, batch: dict) -> Tensor:
    seen: list[Tensor] = []
    mod = model.get_submodule(module)
    if io == "in":
        h = mod.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().clone()))
    else:

        def grab(_m: nn.Module, _a: tuple, out: Any) -> None:
            seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())

        h = mod.register_forward_hook(grab)
    try:
        _run(model, name, batch)
    finally:
        h.remove()
    return seen[-1]


def _ref_mean(model: nn.Module, name: str, module: str, io: str, batches: list) -> Tensor:
    total, count = 0.0, 0.0
    for batch in batches:
        act = _capture(model, name, module, io, batch).double()
        amask = batch.get("attention_mask", torch.ones(act.shape[:2])).double()
        weights = amask.reshape(*amask.shape, *([1] * (act.ndim - 2)))
        total = total + (act * weights).sum((0, 1))
        count = count + amask.sum()
    return total / count


def _replace(x: Tensor, fill: Tensor, sel: Sel) -> Tensor:
    new = x.clone()
    if sel[0] == "all":
        new[...] = fill
    elif sel[0] == "neuron":
        new[..., sel[1]] = fill[..., sel[1]]
    elif sel[0] == "head":
        new[..., sel[1], :] = fill[..., sel[1], :]
    elif sel[0] == "flat_head":
        view = new.view(*new.shape[:-1], sel[2], -1)
        view[..., sel[1], :] = fill.reshape(view.shape)[..., sel[1], :]
    elif sel[0] == "pos":
        new[:, sel[1]] = fill[:, sel[1]]
    return new


def _corrupted(name: str, batch: dict) -> dict:
    """The clean batch with its ids swapped for ``batch['corrupt']`` (the same padding)."""
    out = {k: v for k, v in batch.items() if k != "corrupt"}
    out[CASES[name].ids_key] = batch["corrupt"]
    return out


def _with_corrupt(name: str, batches: list[dict]) -> list[dict]:
    """Each batch paired with another's ids as its counterfactual, padded alike."""
    key = CASES[name].ids_key
    return [dict(b, corrupt=batches[(i + 1) % len(batches)][key]) for i, b in enumerate(batches)]


def _ref_logits(
    name: str, units: list[str], method: str, batch: dict, source: dict | None = None
) -> Tensor:
    model, batches, default_source, _ = _setup(name)
    source = default_source if source is None else source
    # every fill is read from the clean model, before any replacement is attached
    fills: list[Callable[[Tensor], Tensor]] = []
    for unit in units:
        module, io, _sel = CASES[name].units[unit]
        if method == "mean":
            mean = _ref_mean(model, name, module, io, batches)
            fills.append(lambda x, mean=mean: mean.to(x.dtype).expand_as(x))
        elif method == "zero":
            fills.append(torch.zeros_like)
        else:
            src = _capture(model, name, module, io, source)
            fills.append(lambda x, src=src: src)
    handles = []
    try:
        for unit, make in zip(units, fills):
            module, io, sel = CASES[name].units[unit]
            mod = model.get_submodule(module)
            if io == "in":

                def pre(_m: nn.Module, args: tuple, make=make, sel=sel) -> tuple:
                    return (_replace(args[0], make(args[0]), sel), *args[1:])

                handles.append(mod.register_forward_pre_hook(pre))
            else:

                def post(_m: nn.Module, _a: tuple, out: Any, make=make, sel=sel) -> Any:
                    x = out[0] if isinstance(out, tuple) else out
                    new = _replace(x, make(x), sel)
                    return (new, *out[1:]) if isinstance(out, tuple) else new

                handles.append(mod.register_forward_hook(post))
        return _run(model, name, batch)
    finally:
        for h in handles:
            h.remove()


def _ref_metric(metric: str, logits: Tensor, clean: Tensor, batch: dict) -> Tensor:
    """The metric's value per example, written out (mean over the scored positions)."""
    scored = batch["target"] != -100
    z, zc = logits.double(), clean.double()
    t, w = batch["target"].clamp(min=0), batch["wrong"].clamp(min=0)
    if metric == "kl":
        lq, lp = zc.log_softmax(-1), z.log_softmax(-1)
        per_pos = (lq.exp() * (lq - lp)).sum(-1)
    elif metric == "logit_diff":
        per_pos = z.gather(-1, t[..., None])[..., 0] - z.gather(-1, w[..., None])[..., 0]
    elif metric == "loss":
        per_pos = -z.log_softmax(-1).gather(-1, t[..., None])[..., 0]
    else:
        per_pos = (logits.argmax(-1) == batch["target"]).double()
    return (per_pos * scored).sum(1) / scored.sum(1)


def _ref_effect(metric: str, logits: Tensor, clean: Tensor, batch: dict) -> Tensor:
    value = _ref_metric(metric, logits, clean, batch)
    return value if metric == "kl" else value - _ref_metric(metric, clean, clean, batch)


def _check(metric: str, got: Tensor, want: Tensor) -> None:
    got = got.detach().double().cpu()
    if metric == "accuracy":
        assert torch.equal(got, want), (got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# -- the matrix -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mean", "zero", "resample"])
@pytest.mark.parametrize("name", list(CASES))
def test_ablation_effect_equals_plain_hooks(name: str, method: str) -> None:
    model, batches, source, means = _setup(name)
    batch = batches[0]
    clean = _run(model, name, batch)
    moved = 0.0
    for unit in CASES[name].units:
        want_logits = _ref_logits(name, [unit], method, batch)
        moved = max(moved, float((want_logits - clean).abs().max()))
        for metric in METRICS:
            eff = ma.ablation_effect(
                model, batch, unit, means, metric=metric, method=method, source=source, n_boot=10
            )
            _check(metric, eff.per_example, _ref_effect(metric, want_logits, clean, batch))
    assert moved > 1e-3  # the ablations change the output: the comparison can fail


@pytest.mark.parametrize("method", ["mean", "zero", "resample"])
@pytest.mark.parametrize("name", list(CASES))
def test_sweep_and_set_metric_equal_plain_hooks(name: str, method: str) -> None:
    model, batches, _, means = _setup(name)
    units = list(CASES[name].units)
    if method == "resample":  # each example's own corrupted twin supplies the values
        batches, means = _with_corrupt(name, batches), None
        sources = [_corrupted(name, b) for b in batches]
        moved = max(
            float((_ref_logits(name, [u], method, b, s) - _run(model, name, b)).abs().max())
            for u in units
            for b, s in zip(batches, sources)
        )
        assert moved > 1e-3  # the corrupted values differ: the comparison can fail
    else:
        sources = [None] * len(batches)
    cleans = [_run(model, name, b) for b in batches]
    for metric in METRICS:
        want = torch.stack(
            [
                torch.cat(
                    [
                        _ref_effect(metric, _ref_logits(name, [u], method, b, s), c, b)
                        for b, c, s in zip(batches, cleans, sources)
                    ]
                )
                for u in units
            ]
        )
        for fast in (True, False):
            got = ma.sweep(model, batches, units, means, metric=metric, method=method, fast=fast)
            assert got.units == units
            _check(metric, got.per_example, want)
        scorer = SetMetric(model, batches, units, means, metric, method=method)
        for chosen in [[u] for u in units] + [units[:2], units[1:]]:
            ref = torch.cat(
                [
                    _ref_metric(metric, _ref_logits(name, chosen, method, b, s), c, b)
                    for b, c, s in zip(batches, cleans, sources)
                ]
            )
            _check(metric, scorer(chosen), ref)


@pytest.mark.parametrize("name", list(CASES))
def test_calls_leave_every_module_as_it_was(name: str) -> None:
    model, batches, _, means = _setup(name)
    units = list(CASES[name].units)

    def state() -> list:
        return [
            (
                path,
                sorted(m.__dict__),
                dict(m._forward_hooks),
                dict(m._forward_pre_hooks),
                dict(m._backward_hooks),
                dict(m._forward_hooks_with_kwargs),
            )
            for path, m in model.named_modules()
        ]

    _run(model, name, batches[0])
    before = state()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ma.sweep(model, batches, units, means, metric="kl")
    ma.sweep(model, batches, units, means, metric="loss", fast=False)
    ma.attribute(model, batches, units, means, metric="loss")
    for algorithm, threshold in (("acdc", 0.05), ("attribute_verify", None)):
        ma.discover(
            model, batches, means, units=units, metric="loss", algorithm=algorithm,
            threshold=threshold, force=True,
        )  # fmt: skip
    assert state() == before
    after = model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert family_of(model).name == {
        "gpt2": "hf_gpt2",
        "neox": "hf_neox",
        "llama": "hf_llama",
        "bert": "hf_bert",
    }.get(name, name)


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama", "bert"])
def test_sweeps_resume_from_the_units_block(name: str, monkeypatch) -> None:
    """Units of block 1 never re-run the embeddings or block 0 (only the clean run does)."""
    model, batches, _, means = _setup(name)
    units = [u for u in CASES[name].units if ".1." in u or u.endswith(".1@input[pos=2]")]
    assert len(units) == 2
    calls = {"embedding": 0}
    original = nn.Embedding.forward

    def counting(self: nn.Embedding, x: Tensor) -> Tensor:
        calls["embedding"] += 1
        return original(self, x)

    monkeypatch.setattr(nn.Embedding, "forward", counting)
    fast = ma.sweep(model, batches, units, means, metric="kl")
    n_embeddings = calls["embedding"]
    calls["embedding"] = 0
    full = ma.sweep(model, batches, units, means, metric="kl", fast=False)
    # continuous metrics promise float tolerance: the tail runs at the read positions only
    torch.testing.assert_close(fast.per_example, full.per_example, rtol=1e-6, atol=1e-6)
    per_run = calls["embedding"] // (len(batches) * (1 + len(units)))
    assert per_run >= 1 and n_embeddings == per_run * len(batches)


def test_gpt2_saved_and_loaded_is_the_same_family_and_numbers(tmp_path) -> None:
    model, batches, _, means = _setup("gpt2")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert family_of(loaded).name == "hf_gpt2" and family_of(loaded).can_resume()
    units = ma.transformer_units(loaded, "heads", layers=[0]) + ["transformer.h.0.mlp"]
    units += ma.transformer_units(loaded, "neurons", layers=[1])[:4]
    got = ma.sweep(loaded, batches, units, means, metric="loss")
    want = ma.sweep(model, batches, units, means, metric="loss", fast=False)
    torch.testing.assert_close(got.per_example, want.per_example, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_continuous_sweeps_take_the_neurons_linear_write(name: str, monkeypatch) -> None:
    """A layer-0 neuron enters block 1 as ``(fill - act) @ W``: only for continuous
    metrics (a discrete one reruns block 0 through the hook: the hooked forward's bits)."""
    from meanablate.discovery import layerskip

    model, batches, _, means = _setup(name)
    unit = next(u for u in CASES[name].units if ".0.mlp" in u and "neurons" in u)
    used = []
    original = layerskip.run_linear
    monkeypatch.setattr(layerskip, "run_linear", lambda *a: used.append(1) or original(*a))
    for metric in METRICS:
        used.clear()
        fast = ma.sweep(model, batches, [unit], means, metric=metric)
        full = ma.sweep(model, batches, [unit], means, metric=metric, fast=False)
        assert len(used) == (0 if metric == "accuracy" else len(batches))
        if metric == "accuracy":
            assert torch.equal(fast.per_example, full.per_example)
        else:
            torch.testing.assert_close(fast.per_example, full.per_example, rtol=1e-6, atol=1e-6)
            assert full.per_example.abs().max() > 1e-3


LINEAR_UNITS = [
    ("gpt2", "transformer.h.0.attn.c_proj@input[heads=1]"),
    ("llama", "model.layers.0.self_attn.o_proj@input[heads=3]"),
    ("neox", "gpt_neox.layers.0.attention.dense@input[heads=2]"),  # parallel: "post"
    ("bert", "bert.encoder.layer.0.attention.output.dense@input[heads=1]"),
    ("bert", "bert.encoder.layer.0.intermediate[neurons=5]"),  # pre-LN delta, then layer 1
    ("bert", "bert.encoder.layer.1.intermediate[neurons=3]"),  # pre-LN delta, last layer
]


@pytest.mark.parametrize(("name", "unit"), LINEAR_UNITS)
def test_continuous_sweeps_take_the_linear_write_of_heads_and_post_ln_neurons(
    name: str, unit: str, monkeypatch
) -> None:
    """Heads finish their block from the re-projected ablated input (the MLP half only,
    no attention); BERT neurons enter before the output LayerNorm; NeoX's parallel heads
    add to the block output. Continuous metrics only; accuracy keeps the hooked route."""
    from meanablate.discovery import layerskip

    model, batches, _, means = _setup(name)
    used = []
    original = layerskip.run_linear
    monkeypatch.setattr(layerskip, "run_linear", lambda *a: used.append(1) or original(*a))
    # the block's attention must not re-run for a unit on the linear route (counted at
    # the class: a hook on the model would turn the resumed runs off)
    attn_calls = []
    block = family_of(model).blocks()[1][0]
    attn = next(m for n, m in block.named_children() if n in ("attn", "self_attn", "attention"))
    inner = getattr(attn, "self", attn)  # BERT: attention.self holds q/k/v
    attn_forward = type(inner).forward

    def counting(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        attn_calls.append(self is inner)
        return attn_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(inner), "forward", counting)
    for metric in METRICS:
        used.clear()
        attn_calls.clear()
        fast = ma.sweep(model, batches, [unit], means, metric=metric)
        n_clean = len(attn_calls)
        full = ma.sweep(model, batches, [unit], means, metric=metric, fast=False)
        assert len(used) == (0 if metric == "accuracy" else len(batches))
        if metric == "accuracy":
            assert torch.equal(fast.per_example, full.per_example)
            continue
        torch.testing.assert_close(fast.per_example, full.per_example, rtol=1e-6, atol=1e-6)
        assert full.per_example.abs().max() > 1e-3
        if ".0." in unit:  # block 0's attention ran in the clean runs only
            assert sum(attn_calls[:n_clean]) == len(batches)


@pytest.mark.parametrize("fault", ["shape", "padding", "mask_shape"])
def test_a_misaligned_corrupt_field_is_a_clear_error(fault: str) -> None:
    """A counterfactual that does not line up with its clean batch is refused by every
    resample path (sweep fast and not, SetMetric, discover), naming the field and shapes."""
    model, batches, _, _ = _setup("gpt2")
    bad = _with_corrupt("gpt2", batches)
    amask = bad[1]["attention_mask"]
    if fault == "shape":  # one position short
        bad[1]["corrupt"] = bad[1]["corrupt"][:, :-1]
        want = r"batch\['corrupt'\] has shape \(4, 5\), batch\['input_ids'\] has \(4, 6\)"
    elif fault == "padding":  # the same shape, padded on the other side
        bad[1]["corrupt_attention_mask"] = amask.flip(-1)
        want = (
            r"batch\['corrupt_attention_mask'\] \(shape \(4, 6\), .*\) differs from "
            r"batch\['attention_mask'\] \(shape \(4, 6\)"
        )
    else:
        bad[1]["corrupt_attention_mask"] = amask[:, :-1]
        want = (
            r"batch\['corrupt_attention_mask'\] \(shape \(4, 5\), .*\) differs from "
            r"batch\['attention_mask'\] \(shape \(4, 6\)"
        )
    units = list(CASES["gpt2"].units)[:2]
    calls = {
        "sweep": lambda: ma.sweep(model, bad, units, None, metric="kl", method="resample"),
        "sweep(fast=False)": lambda: ma.sweep(
            model, bad, units, None, metric="kl", method="resample", fast=False
        ),
        "SetMetric": lambda: SetMetric(model, bad, units, None, "kl", method="resample")(units),
        "discover": lambda: ma.discover(
            model,
            bad,
            None,
            units=units,
            metric="kl",
            method="resample",
            threshold=0.01,
            force=True,
        ),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match=want):
            call()
        assert not _any_hooks(model), what


def _any_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_sequential_neox_heads_finish_their_block_like_the_hooked_forward(monkeypatch) -> None:
    """``use_parallel_residual=False``: the heads' change enters the stream the MLP reads
    (not only the block output), so the route re-runs the MLP half (float tolerance: the
    tail runs at the read positions only)."""
    from meanablate.discovery import layerskip

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=24,
        max_position_embeddings=P, vocab_size=VOCAB, initializer_range=0.3,
        use_parallel_residual=False,
    )  # fmt: skip
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    batches = [_batch(CASES["neox"], 1), _batch(CASES["neox"], 2)]
    units = [f"gpt_neox.layers.{layer}.attention.dense@input[heads=2]" for layer in (0, 1)]
    means = ma.compute_means(model, sorted({ma.parse_site(u).key for u in units}), batches)
    used = []
    original = layerskip.run_linear
    monkeypatch.setattr(layerskip, "run_linear", lambda *a: used.append(1) or original(*a))
    fast = ma.sweep(model, batches, units, means, metric="loss")
    assert len(used) == len(units) * len(batches)
    full = ma.sweep(model, batches, units, means, metric="loss", fast=False)
    torch.testing.assert_close(fast.per_example, full.per_example, rtol=1e-6, atol=1e-6)
    assert full.per_example.abs().max() > 1e-3


@pytest.mark.parametrize("name", ["ours", "gpt2", "llama", "generic"])
def test_resample_sweep_runs_the_corrupted_input_once_per_batch(name: str, monkeypatch) -> None:
    """The fast sweep captures every unit's counterfactual from one corrupted forward per
    batch (``fast=False``: one per unit, which shows the count can fail); on families that
    resume, no unit runs the whole model either."""
    model, batches, _, _ = _setup(name)
    key = CASES[name].ids_key
    # a counterfactual no clean batch shares, so a forward's input tells which run it is
    batches = [dict(b, corrupt=(b[key] + 1) % VOCAB) for b in batches]
    units = list(CASES[name].units)
    calls: list[str] = []
    cls = type(model)
    forward = cls.forward

    @functools.wraps(forward)  # run_model reads the signature
    def spy(self, *args, **kwargs):
        ids = kwargs.get(key, args[0] if args else None)
        is_corrupt = any(ids is not None and torch.equal(ids, b["corrupt"]) for b in batches)
        calls.append("corrupt" if is_corrupt else "clean")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", spy)
    for fast in (True, False):
        calls.clear()
        ma.sweep(model, batches, units, None, metric="kl", method="resample", fast=fast)
        per_unit = 1 if fast else len(units)
        assert calls.count("corrupt") == per_unit * len(batches), (fast, calls)
        if fast and name != "generic":  # + check_units_fit's one-example forward
            assert calls.count("clean") == len(batches) + 1, calls
