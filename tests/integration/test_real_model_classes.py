"""Real model classes, built offline with random weights: HF GPT-2, HF BERT, a TransformerLens
TransformerBridge over a local GPT-2, and a plain nn.Sequential MLP.

For each: ``compute_means`` equals a naive capture-then-average reference (hand-written
torch hooks, or TransformerLens's own ``run_with_cache``), and the forward pass inside
``ablate()`` equals a hand-written reference hook doing the same mean replacement (or
TransformerLens's own ``run_with_hooks``), to 1e-6. Also the HF adapter helpers.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn

from meanablate import Site, ablate, compute_means, parse_site, run_model

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from meanablate.adapters import huggingface as hfa  # noqa: E402

ATOL = 1e-6


# -- references, independent of meanablate's hooks --------------------------------------------
def naive_capture(model: nn.Module, keys: list[str], run) -> dict[str, torch.Tensor]:
    """The activation at each key (a module's output, or its first input) during ``run()``."""
    store = {}
    handles = []

    def first(x):
        return x[0] if isinstance(x, tuple) else x

    for key in keys:
        mod = model.get_submodule(key.removesuffix("@input"))
        if key.endswith("@input"):
            handles.append(
                mod.register_forward_pre_hook(
                    lambda m, a, k=key: store.__setitem__(k, a[0].detach())
                )
            )
        else:
            handles.append(
                mod.register_forward_hook(
                    lambda m, a, o, k=key: store.__setitem__(k, first(o).detach())
                )
            )
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return store


def naive_means(model: nn.Module, keys: list[str], batches: list) -> dict[str, torch.Tensor]:
    """Capture every batch, then average the real tokens (``attention_mask``) per key."""
    acts = [naive_capture(model, keys, lambda b=b: model(**b)) for b in batches]
    masks = [b["attention_mask"] for b in batches]
    return {k: average([a[k] for a in acts], masks) for k in keys}


def average(acts: list[torch.Tensor], masks: list[torch.Tensor | None]) -> torch.Tensor:
    """Concatenate the real tokens of every batch and average in float64."""
    rows = []
    for act, mask in zip(acts, masks):
        act = act.double()
        if mask is None:
            rows.append(act.reshape(-1, *act.shape[2:]) if act.ndim >= 3 else act)
        else:
            rows.append(act[mask.bool()])
    return torch.cat(rows).mean(0)


def flat_cols(heads: list[int], n_heads: int, width: int) -> list[int]:
    d_head = width // n_heads
    return [h * d_head + i for h in heads for i in range(d_head)]


class HandHooks:
    """Hand-written replacement hooks: ``put(key, fn)`` with ``fn(act) -> new act``."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.handles = model, []

    def put(self, key: str, fn) -> None:
        mod = self.model.get_submodule(key.removesuffix("@input"))
        if key.endswith("@input"):
            self.handles.append(
                mod.register_forward_pre_hook(lambda m, a: (fn(a[0].clone()), *a[1:]))
            )
        else:

            def post(m, a, o):
                if isinstance(o, tuple):
                    return (fn(o[0].clone()), *o[1:])
                return fn(o.clone())

            self.handles.append(mod.register_forward_hook(post))

    def __enter__(self) -> HandHooks:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def hook_ids(model: nn.Module) -> list[tuple[str, list[int], list[int]]]:
    return [
        (name, list(m._forward_hooks), list(m._forward_pre_hooks))
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    ]


def no_hooks(model: nn.Module) -> bool:
    return hook_ids(model) == []


# -- tokenizers built offline -------------------------------------------------------------------
WORDS = [f"w{i}" for i in range(40)]


def word_tokenizer(specials: dict[str, str], bert: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*specials.values(), *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    if bert:
        specials = {
            **specials,
            "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        }
    return PreTrainedTokenizerFast(tokenizer_object=tk, **specials)


BERT_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
GPT_SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def texts(n: int, seed: int, max_len: int = 12) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, max_len + 1, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, 40, (k,), generator=g)))
    return out


# -- HF GPT-2 -----------------------------------------------------------------------------------
def gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=100,
        n_positions=32,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def gpt2_batches() -> list[dict[str, torch.Tensor]]:
    tok = word_tokenizer(GPT_SPECIALS)
    return hfa.batches_from_texts(tok, texts(11, seed=1), batch_size=4)  # 4 + 4 + 3


GPT2_SITES = [
    hfa.gpt2_head_site(1, [1, 3], n_heads=4),  # transformer.h.1.attn.c_proj@input
    hfa.gpt2_neuron_site(0, [5, 17, 200]),  # transformer.h.0.mlp.act
    hfa.gpt2_resid_site(1, positions=[0, 2]),  # transformer.h.1@input
]


def test_gpt2_means_and_ablation_match_hand_hooks() -> None:
    model, batches = gpt2(), gpt2_batches()
    assert len({b["input_ids"].shape[1] for b in batches}) > 1  # widths differ
    assert any(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in batches)
    means = compute_means(model, GPT2_SITES, batches)
    ref = naive_means(model, [s.key for s in GPT2_SITES], batches)
    for key, want in ref.items():
        torch.testing.assert_close(means[key], want, rtol=1e-10, atol=1e-12)
    assert float(means.counts[GPT2_SITES[0].key]) == sum(
        int(b["attention_mask"].sum()) for b in batches
    )

    heads_key, act_key, resid_key = (s.key for s in GPT2_SITES)
    cols = flat_cols([1, 3], 4, 64)

    def heads(a):
        a[..., cols] = ref[heads_key][cols].float()
        return a

    def neurons(a):
        a[..., [5, 17, 200]] = ref[act_key][[5, 17, 200]].float()
        return a

    def resid(a):
        a[:, [0, 2]] = ref[resid_key].float()
        return a

    for batch in batches:
        with HandHooks(model) as hooks, torch.no_grad():
            hooks.put(heads_key, heads)
            hooks.put(act_key, neurons)
            hooks.put(resid_key, resid)
            want = model(**batch).logits
        with torch.no_grad(), ablate(model, GPT2_SITES, means):
            got = model(**batch).logits
        with torch.no_grad():
            clean = model(**batch).logits
        assert (got - clean).abs().max() > 1e-3  # the ablation does something
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert no_hooks(model)


def test_gpt2_per_position_residual_means() -> None:
    model, batches = gpt2(), gpt2_batches()
    site = hfa.gpt2_resid_site(1, positions=[1, 4])
    means = compute_means(model, [site], batches, per_position=True)
    width = max(b["input_ids"].shape[1] for b in batches)
    sums = torch.zeros(width, 64, dtype=torch.float64)
    counts = torch.zeros(width, dtype=torch.float64)
    for b in batches:
        act = naive_capture(model, [site.key], lambda b=b: model(**b))[site.key].double()
        for i in range(act.shape[0]):
            for p in range(act.shape[1]):
                if b["attention_mask"][i, p]:
                    sums[p] += act[i, p]
                    counts[p] += 1
    ref = sums / counts.clamp_min(1)[:, None]
    torch.testing.assert_close(means[site.key], ref, rtol=1e-10, atol=1e-12)
    batch = batches[0]
    n = batch["input_ids"].shape[1]

    def resid(a):
        a[:, [1, 4]] = ref[[1, 4]].float()
        return a

    with HandHooks(model) as hooks, torch.no_grad():
        hooks.put(site.key, resid)
        want = model(**batch).logits
    with torch.no_grad(), ablate(model, site, means):
        got = model(**batch).logits
    assert got.shape[1] == n
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


# -- HF BERT --------------------------------------------------------------------------------------
def bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=45,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        pad_token_id=0,
    )


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "BertModel"])
def test_bert_means_and_ablation_match_hand_hooks(cls_name: str) -> None:
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(bert_config()).eval()
    prefix = "bert" if cls_name == "BertForMaskedLM" else ""
    tok = word_tokenizer(BERT_SPECIALS, bert=True)
    batches = hfa.batches_from_texts(tok, texts(10, seed=2), batch_size=3)
    assert set(batches[0]) == {"input_ids", "token_type_ids", "attention_mask"}
    sites = [
        hfa.bert_neuron_site(1, [0, 7, 47], prefix=prefix),  # encoder.layer.1.intermediate
        parse_site(
            f"{prefix + '.' if prefix else ''}encoder.layer.0.intermediate.intermediate_act_fn"
            "[neurons=3;pos=1]"
        ),
        hfa.bert_head_site(1, [2], n_heads=4, prefix=prefix),
    ]
    means = compute_means(model, sites, batches)
    ref = naive_means(model, [s.key for s in sites], batches)
    for key, want in ref.items():
        torch.testing.assert_close(means[key], want, rtol=1e-10, atol=1e-12)

    def out(o):
        return o.logits if hasattr(o, "logits") else o.last_hidden_state

    k_inter, k_act, k_head = (s.key for s in sites)
    cols = flat_cols([2], 4, 32)
    for batch in batches:

        def inter(a):
            a[..., [0, 7, 47]] = ref[k_inter][[0, 7, 47]].float()
            return a

        def act(a):
            a[:, 1, 3] = ref[k_act][3].float()
            return a

        def head(a):
            a[..., cols] = ref[k_head][cols].float()
            return a

        with HandHooks(model) as hooks, torch.no_grad():
            hooks.put(k_inter, inter)
            hooks.put(k_act, act)
            hooks.put(k_head, head)
            want = out(model(**batch))
        with torch.no_grad(), ablate(model, sites, means):
            got = out(model(**batch))
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert no_hooks(model)


# -- TransformerLens TransformerBridge over a local GPT-2 ---------------------------------------
@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    path = tmp_path_factory.mktemp("gpt2_local")
    model = gpt2(seed=3)
    model.save_pretrained(path)
    word_tokenizer(GPT_SPECIALS).save_pretrained(path)
    # a local directory: config, weights and tokenizer are read from disk, nothing from the hub
    br = TransformerBridge.boot_transformers(str(path), device="cpu")
    return br.eval(), model


@pytest.mark.slow
def test_transformer_bridge_means_and_ablation_match_tl_hooks(bridge) -> None:
    br, hf_model = bridge
    batches = gpt2_batches()
    with torch.no_grad():
        br(batches[0]["input_ids"])  # the bridge attaches hooks of its own on a first forward
    hooks_before = hook_ids(br)
    sites = [
        Site("blocks.1.attn.hook_z", heads=(0, 2)),  # TL's [b, p, head, d_head], as TL hooks see it
        Site("blocks.0.mlp.hook_post", neurons=(3, 100)),
        Site("blocks.1.hook_resid_pre", positions=(1,)),
    ]
    means = compute_means(br, sites, batches)
    ref = {}
    for site in sites:
        acts = []
        for b in batches:  # TransformerLens's own cache
            _, cache = br.run_with_cache(
                b["input_ids"], attention_mask=b["attention_mask"], names_filter=[site.module]
            )
            acts.append(cache[site.module])
        ref[site.module] = average(acts, [b["attention_mask"] for b in batches])
        got = means[site.key].reshape(ref[site.module].shape)
        torch.testing.assert_close(got, ref[site.module], rtol=1e-10, atol=1e-12)

    def z_hook(z, hook):
        flat = z.reshape(*z.shape[:2], 64).clone()
        cols = flat_cols([0, 2], 4, 64)
        flat[..., cols] = ref["blocks.1.attn.hook_z"].reshape(64)[cols].float()
        return flat.reshape(z.shape)

    def post_hook(a, hook):
        a = a.clone()
        a[..., [3, 100]] = ref["blocks.0.mlp.hook_post"][[3, 100]].float()
        return a

    def resid_hook(a, hook):
        a = a.clone()
        a[:, 1] = ref["blocks.1.hook_resid_pre"].float()
        return a

    fwd = [
        ("blocks.1.attn.hook_z", z_hook),
        ("blocks.0.mlp.hook_post", post_hook),
        ("blocks.1.hook_resid_pre", resid_hook),
    ]
    for b in batches:
        with torch.no_grad():
            want = br.run_with_hooks(
                b["input_ids"], fwd_hooks=fwd, attention_mask=b["attention_mask"]
            )
            with ablate(br, sites, means):
                got = br(b["input_ids"], attention_mask=b["attention_mask"])
                got_dict = run_model(br, b)  # tokenizer-style dict: input_ids -> input
            clean = br(b["input_ids"], attention_mask=b["attention_mask"])
        assert (got - clean).abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        torch.testing.assert_close(got_dict, want, rtol=0, atol=ATOL)
    assert hook_ids(br) == hooks_before
    # the same ablation named the HF way on the HF model gives the same logits
    hf_sites = [
        hfa.gpt2_head_site(1, [0, 2], 4),
        hfa.gpt2_neuron_site(0, [3, 100]),
        hfa.gpt2_resid_site(1, positions=1),
    ]
    hf_means = compute_means(hf_model, hf_sites, batches)
    for site, hf_site in zip(sites, hf_sites):
        want = hf_means[hf_site.key].reshape(means[site.key].shape)  # HF's c_proj input is flat
        torch.testing.assert_close(want, means[site.key], rtol=1e-6, atol=1e-6)
    b = batches[0]
    with torch.no_grad(), ablate(hf_model, hf_sites, hf_means):
        hf_out = hf_model(**b).logits
    with torch.no_grad(), ablate(br, sites, means):
        br_out = br(b["input_ids"], attention_mask=b["attention_mask"])
    torch.testing.assert_close(br_out, hf_out, rtol=0, atol=1e-5)


# -- plain nn.Sequential MLP --------------------------------------------------------------------
def test_sequential_mlp_means_and_ablation_match_hand_hooks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3)
    ).eval()
    g = torch.Generator().manual_seed(4)
    for batches in (
        [torch.randn(n, 6, generator=g) for n in (5, 1, 9)],  # [batch, d]
        [torch.randn(n, p, 6, generator=g) for n, p in ((2, 3), (4, 1), (1, 7))],  # [b, p, d]
    ):
        sites = ["1[neurons=0,9,15]", "3", "4@input[neurons=2]"]
        means = compute_means(model, sites, batches)
        keys = ["1", "3", "4@input"]
        acts = [naive_capture(model, keys, lambda x=x: model(x)) for x in batches]
        ref = {k: average([a[k] for a in acts], [None] * len(acts)) for k in keys}
        for key in keys:
            torch.testing.assert_close(means[key], ref[key], rtol=1e-10, atol=1e-12)

        def relu(a, ref=ref):
            a[..., [0, 9, 15]] = ref["1"][[0, 9, 15]].float()
            return a

        def gelu(a, ref=ref):
            return ref["3"].float().expand_as(a).clone()

        def proj_in(a, ref=ref):
            a[..., 2] = ref["4@input"][2].float()
            return a

        for x in batches:
            with HandHooks(model) as hooks, torch.no_grad():
                hooks.put("1", relu)
                hooks.put("3", gelu)
                hooks.put("4@input", proj_in)
                want = model(x)
            for grad in (False, True):
                with torch.set_grad_enabled(grad), ablate(model, sites, means):
                    got = model(x)
                    if grad:  # means from compute_means work in an autograd graph
                        got.sum().backward()
                torch.testing.assert_close(got.detach(), want, rtol=0, atol=ATOL)
        assert no_hooks(model)


# -- the HF adapter helpers ---------------------------------------------------------------------
def test_site_helpers_name_real_modules() -> None:
    from transformers import BertModel, GPT2Config, GPT2Model

    assert (
        str(hfa.gpt2_head_site(1, 3, 4)) == "transformer.h.1.attn.c_proj@input[heads=3;n_heads=4]"
    )
    assert str(hfa.gpt2_neuron_site(0)) == "transformer.h.0.mlp.act"
    assert str(hfa.gpt2_resid_site(1)) == "transformer.h.1@input"
    assert str(hfa.bert_neuron_site(1, [3, 4])) == "bert.encoder.layer.1.intermediate[neurons=3,4]"
    assert (
        str(hfa.bert_head_site(0, 1, 4)) == "bert.encoder.layer.0.attention.output.dense@input"
        "[heads=1;n_heads=4]"
    )
    assert [str(s) for s in hfa.gpt2_head_units(2, 2)] == [
        f"transformer.h.{L}.attn.c_proj@input[heads={h};n_heads=2]" for L in (0, 1) for h in (0, 1)
    ]
    lm, bert_lm = gpt2(), transformers.BertForMaskedLM(bert_config())
    base = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10, n_positions=8))
    bert_base = BertModel(bert_config())
    for model, site in [
        (lm, hfa.gpt2_head_site(1, 0, 4)),
        (lm, hfa.gpt2_neuron_site(1)),
        (lm, hfa.gpt2_resid_site(0)),
        (base, hfa.gpt2_head_site(0, 1, 2, prefix="")),
        (base, hfa.gpt2_neuron_site(0, prefix="")),
        (bert_lm, hfa.bert_neuron_site(1)),
        (bert_lm, hfa.bert_head_site(1, 0, 4)),
        (bert_base, hfa.bert_neuron_site(0, prefix="")),
        (bert_base, hfa.bert_head_site(0, 3, 4, prefix="")),
    ]:
        assert site.module in dict(model.named_modules())
    assert hfa.n_heads_of(lm) == 4 and hfa.n_heads_of(bert_lm.config) == 4
    with pytest.raises(ValueError, match="heads"):
        hfa.n_heads_of(nn.Linear(1, 1))
    with pytest.raises(ValueError, match="layer"):
        hfa.gpt2_neuron_site(-1)
    with pytest.raises(IndexError, match="negative"):
        hfa.gpt2_head_site(0, -1, 4)


def test_batches_from_texts_pads_like_one_by_one_tokenization(tmp_path) -> None:
    tok = word_tokenizer(BERT_SPECIALS, bert=True)
    tok.save_pretrained(tmp_path)
    tok = hfa.load_tokenizer(tmp_path)
    data = texts(7, seed=5)
    batches = hfa.batches_from_texts(tok, data, batch_size=3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    pad = tok.pad_token_id
    for start, batch in zip(range(0, 7, 3), batches):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.dtype == torch.long and ids.shape == mask.shape
        singles = [tok(t)["input_ids"] for t in data[start : start + 3]]
        assert ids.shape[1] == max(len(s) for s in singles)
        for row, m, s in zip(ids.tolist(), mask.tolist(), singles):
            assert row[: len(s)] == s and m[: len(s)] == [1] * len(s)
            assert row[len(s) :] == [pad] * (len(row) - len(s)) and m[len(s) :] == [0] * (
                len(row) - len(s)
            )
    # left padding and truncation
    left = hfa.batches_from_texts(tok, data, batch_size=7, padding_side="left", max_length=5)[0]
    assert tok.padding_side == "right"  # restored
    assert left["input_ids"].shape[1] <= 5
    for row, m, t in zip(left["input_ids"].tolist(), left["attention_mask"].tolist(), data):
        s = tok(t, truncation=True, max_length=5)["input_ids"]
        assert row[len(row) - len(s) :] == s and sum(m) == len(s) and m[-1] == 1
    # the batches feed compute_means with padding excluded
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config()).eval()
    means = compute_means(model, [hfa.bert_neuron_site(0, prefix="")], batches)
    n_real = sum(len(tok(t)["input_ids"]) for t in data)
    assert float(means.counts["encoder.layer.0.intermediate"]) == n_real


def test_batches_from_texts_bad_inputs(tmp_path) -> None:
    tok = word_tokenizer(BERT_SPECIALS, bert=True)
    with pytest.raises(TypeError, match="not one string"):
        hfa.batches_from_texts(tok, "w1 w2", 2)
    with pytest.raises(ValueError, match="non-empty"):
        hfa.batches_from_texts(tok, [], 2)
    with pytest.raises(ValueError, match="batch_size"):
        hfa.batches_from_texts(tok, ["w1"], 0)
    with pytest.raises(ValueError, match="padding_side"):
        hfa.batches_from_texts(tok, ["w1"], 1, padding_side="middle")
    no_pad = word_tokenizer({"unk_token": "<unk>", "eos_token": "</s>"})
    with pytest.raises(ValueError, match="no pad token"):
        hfa.batches_from_texts(no_pad, ["w1", "w2 w3"], 2)
    with pytest.raises(FileNotFoundError):
        hfa.load_tokenizer(tmp_path / "missing")
