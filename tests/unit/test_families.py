"""Model families: detection, unit listing and site checks on every family."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import meanablate as ma
from meanablate.families import check_sites, family_of, unwrap
from meanablate.organisms.transformer import HookedTransformer, TransformerConfig

transformers = pytest.importorskip("transformers")


def _models() -> dict[str, nn.Module]:
    t = transformers
    torch.manual_seed(0)
    return {
        "hf_gpt2": t.GPT2LMHeadModel(
            t.GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=30, n_positions=8, n_inner=20)
        ),
        "hf_neox": t.GPTNeoXForCausalLM(
            t.GPTNeoXConfig(
                num_hidden_layers=2,
                hidden_size=16,
                num_attention_heads=4,
                vocab_size=30,
                intermediate_size=20,
                max_position_embeddings=8,
            )
        ),
        "hf_llama": t.LlamaForCausalLM(
            t.LlamaConfig(
                num_hidden_layers=2,
                hidden_size=16,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=30,
                intermediate_size=20,
                max_position_embeddings=8,
            )
        ),
        "hf_bert": t.BertForMaskedLM(
            t.BertConfig(
                num_hidden_layers=2,
                hidden_size=16,
                num_attention_heads=4,
                vocab_size=30,
                intermediate_size=20,
                max_position_embeddings=8,
            )
        ),
        "ours": HookedTransformer(
            TransformerConfig(
                n_layers=2, d_model=16, n_heads=4, d_head=4, d_vocab=30, n_ctx=8, d_mlp=20
            )
        ),
    }


MODELS = {k: m.eval() for k, m in _models().items()}
HEADS = {
    "hf_gpt2": "transformer.h.{L}.attn.c_proj@input",
    "hf_neox": "gpt_neox.layers.{L}.attention.dense@input",
    "hf_llama": "model.layers.{L}.self_attn.o_proj@input",
    "hf_bert": "bert.encoder.layer.{L}.attention.output.dense@input",
    "ours": "blocks.{L}.attn.hook_z",
}
NEURONS = {
    "hf_gpt2": "transformer.h.{L}.mlp.act",
    "hf_neox": "gpt_neox.layers.{L}.mlp.dense_4h_to_h@input",
    "hf_llama": "model.layers.{L}.mlp.down_proj@input",
    "hf_bert": "bert.encoder.layer.{L}.intermediate",
    "ours": "blocks.{L}.mlp.hook_post",
}
MLPS = {
    "hf_gpt2": "transformer.h.{L}.mlp",
    "hf_neox": "gpt_neox.layers.{L}.mlp",
    "hf_llama": "model.layers.{L}.mlp",
    "hf_bert": "bert.encoder.layer.{L}.output.dense",
    "ours": "blocks.{L}.hook_mlp_out",
}


def _ids(name: str) -> dict:
    ids = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(1))
    return {"tokens": ids} if name == "ours" else {"input_ids": ids}


@pytest.mark.parametrize("name", list(MODELS))
def test_transformer_units_name_the_family_sites(name: str) -> None:
    model = MODELS[name]
    assert family_of(model).name == name
    heads = ma.transformer_units(model, "heads", layers=[1])
    assert heads == [HEADS[name].format(L=1) + f"[heads={h}]" for h in range(4)]
    neurons = ma.transformer_units(model, "neurons", layers=[0])
    assert neurons == [NEURONS[name].format(L=0) + f"[neurons={i}]" for i in range(20)]
    assert ma.transformer_units(model, "mlps") == [MLPS[name].format(L=i) for i in (0, 1)]
    comps = ma.transformer_units(model, "components")
    assert len(comps) == 2 * 5 and comps[4] == MLPS[name].format(L=0)
    assert len(ma.transformer_units(model, "layers")) == 4
    positions = ma.transformer_units(model, "positions", layers=[1], n_positions=3)
    assert len(positions) == 3 and positions[2].endswith("[pos=2]")
    # every listed unit names a real module, and its activation has the listed units
    batch = _ids(name)
    all_units = comps + neurons + ma.transformer_units(model, "layers") + positions
    means = ma.compute_means(model, all_units, [batch])
    for unit in all_units:
        site = check_sites(model, unit)[0]
        shape = means[site.key].shape
        if site.neurons is not None:
            assert shape[-1] == 20
        if site.heads is not None:
            assert shape[-1] == 16 or tuple(shape[-2:]) == (4, 4)
    with pytest.raises(IndexError, match="layer 2 out of range"):
        ma.transformer_units(model, "heads", layers=[2])
    with pytest.raises(ValueError, match="n_positions"):
        ma.transformer_units(model, "positions")
    with pytest.raises(ValueError, match="granularity"):
        ma.transformer_units(model, "wires")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [n for n in MODELS if n != "ours"])
def test_flat_heads_take_n_heads_from_the_config(name: str) -> None:
    model = MODELS[name]
    key = HEADS[name].format(L=0)
    (site,) = check_sites(model, f"{key}[heads=1]")
    assert site.n_heads == 4
    assert check_sites(model, f"{key}[heads=1;n_heads=4]") == [site]
    with pytest.raises(ValueError, match=r"n_heads=2.*4 heads"):
        check_sites(model, f"{key}[heads=1;n_heads=2]")
    with pytest.raises(IndexError, match=rf"{key}\[heads=13\].*4 heads.*0\.\.3"):
        check_sites(model, f"{key}[heads=13]")
    # the same numbers as the explicit n_heads, and not a position ablation
    batch = _ids(name)
    means = ma.compute_means(model, [key], [batch])
    implicit = ma.ablation_effect(model, batch, f"{key}[heads=1]", means, metric="l2", n_boot=10)
    explicit = ma.ablation_effect(
        model, batch, f"{key}[heads=1;n_heads=4]", means, metric="l2", n_boot=10
    )
    assert torch.equal(implicit.per_example, explicit.per_example)
    assert implicit.value > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_heads_on_an_activation_without_a_head_axis_is_an_error(name: str) -> None:
    model = MODELS[name]
    mlp = MLPS[name].format(L=0)
    want = HEADS[name].format(L=0) + r"\[heads=h\]"
    for call in (
        lambda: ma.ablate(model, f"{mlp}[heads=0]", method="zero").__enter__(),
        lambda: ma.compute_means(model, [f"{mlp}[heads=0]"], [_ids(name)]),
        lambda: ma.sweep(model, [_ids(name)], [f"{mlp}[heads=0]"], None, method="zero"),
    ):
        with pytest.raises(ValueError, match=rf"no head axis.*{want}"):
            call()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_ours_rejects_heads_on_patterns_and_n_heads_on_hook_z() -> None:
    model = MODELS["ours"]
    with pytest.raises(ValueError, match=r"\[batch, head, query, key\].*hook_z"):
        check_sites(model, "blocks.0.attn.hook_pattern[heads=1]")
    with pytest.raises(ValueError, match="already has a head axis"):
        check_sites(model, "blocks.0.attn.hook_z[heads=1;n_heads=4]")
    with pytest.raises(IndexError, match="head 4 out of range"):
        check_sites(model, "blocks.1.attn.hook_z[heads=4]")
    # an explicit flat view of another activation stays the user's choice
    assert check_sites(model, "blocks.0.hook_attn_in@input[heads=0;n_heads=2]")[0].n_heads == 2


class Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mix(x))


def test_generic_heads_need_n_heads_on_a_flat_activation() -> None:
    model = Flat().eval()
    assert family_of(model).name == "generic"
    x = torch.randn(2, 4, 8)
    with (
        pytest.raises(ValueError, match=r"no head dim.*pass n_heads"),
        torch.no_grad(),
        ma.ablate(model, "out@input[heads=1]", method="zero"),
    ):
        model(x)
    assert not any(m._forward_pre_hooks for m in model.modules())
    with torch.no_grad(), ma.ablate(model, "out@input[heads=1;n_heads=2]", method="zero"):
        got = model(x)
    with torch.no_grad():
        h = model.mix(x)
        h[..., 4:] = 0
        want = model.out(h)
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="no known model family"):
        ma.transformer_units(model, "heads")


def test_nnsight_wrappers_unwrap_to_the_module() -> None:
    nnsight = pytest.importorskip("nnsight")  # the real class: NNsight holds ``_module``

    class Lookalike:  # an object holding a module is not a wrapper unless it is nnsight's
        def __init__(self, m: nn.Module) -> None:
            self._model = self._module = m

    model = copy.deepcopy(MODELS["hf_gpt2"])  # NNsight instruments every module it wraps
    assert unwrap(nnsight.NNsight(model)) is model
    assert family_of(nnsight.NNsight(model)).name == "hf_gpt2"
    for bad in (object(), Lookalike(model)):
        with pytest.raises(TypeError, match=r"nn\.Module"):
            unwrap(bad)


def test_llama_style_classes_are_recognised_by_structure() -> None:
    t = transformers
    cfg = t.Qwen2Config(
        num_hidden_layers=1,
        hidden_size=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=30,
        intermediate_size=20,
        max_position_embeddings=8,
    )
    model = t.Qwen2ForCausalLM(cfg).eval()
    family = family_of(model)
    assert family.name == "hf_llama" and family.can_resume()
    assert (
        ma.transformer_units(model, "heads")[0] == "model.layers.0.self_attn.o_proj@input[heads=0]"
    )


def test_a_cache_holding_earlier_tokens_is_never_dropped() -> None:
    # A repeated block call may drop a key/value cache only if it held nothing before this
    # forward: empty at block 0, exactly this forward's tokens at a later block. A cache
    # holding as many *earlier* tokens as the input (4 and 4 here) must not pass at block 0.
    from transformers import DynamicCache

    family = family_of(MODELS["hf_gpt2"])
    hidden = torch.zeros(1, 4, 16)

    def cache(n_tokens: int) -> DynamicCache:
        c = DynamicCache()
        if n_tokens:
            kv = torch.zeros(1, 4, n_tokens, 8)
            c.update(kv, kv, 0)
        return c

    assert family.resume_call((hidden,), {"past_key_values": cache(0)}, block=0) is not None
    assert family.resume_call((hidden,), {"past_key_values": cache(4)}, block=0) is None
    assert family.resume_call((hidden,), {"past_key_values": cache(4)}, block=1) is not None
    assert family.resume_call((hidden,), {"past_key_values": cache(8)}, block=1) is None
    kept = family.resume_call((hidden,), {"past_key_values": cache(0)}, block=0)
    assert kept is not None and kept[1]["past_key_values"] is None
