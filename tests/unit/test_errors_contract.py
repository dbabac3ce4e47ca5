"""The error contract of docs/errors.md: bad input to a public entry point is a
``ValueError``/``TypeError``/``IndexError`` (or a documented subclass) that names the
argument or site, raised before any work and never an ``assert``."""

from __future__ import annotations

import pytest
import torch

import meanablate as ma
from meanablate.errors import MeanAblateError, MissingSiteError
from meanablate.organisms.transformer import HookedTransformer, TransformerConfig

torch.set_num_threads(1)
CFG = TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=7, n_ctx=6, d_mlp=12)
torch.manual_seed(0)
MODEL = HookedTransformer(CFG).eval()
TOKENS = torch.randint(0, 7, (3, 5))
UNITS = ["blocks.0.attn.hook_z[heads=0]", "blocks.1.mlp.hook_post[neurons=2]"]
MEANS = ma.compute_means(MODEL, ["blocks.0.attn.hook_z", "blocks.1.mlp.hook_post"], [TOKENS])
CONTRACT = (ValueError, TypeError, IndexError)


@pytest.mark.parametrize("fast", [True, False])
def test_sweep_without_means_is_a_value_error_not_an_assert(fast: bool) -> None:
    with pytest.raises(ValueError, match=r"sweep: method='mean' needs means \(got means=None\)"):
        ma.sweep(MODEL, [TOKENS], UNITS, None, fast=fast)
    # a means object of the wrong type, and an unknown method
    with pytest.raises(TypeError, match=r"sweep: means must be a meanablate.Means.*got dict"):
        ma.sweep(MODEL, [TOKENS], UNITS, {"blocks.0.attn.hook_z": torch.zeros(2, 4)}, fast=fast)
    with pytest.raises(ValueError, match="method must be one of mean, zero, resample; got 'avg'"):
        ma.sweep(MODEL, [TOKENS], UNITS, MEANS, method="avg", fast=fast)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "entry",
    [
        lambda: ma.attribute(MODEL, [TOKENS], UNITS, None, metric="kl"),
        lambda: ma.discover(MODEL, [TOKENS], None, units=UNITS, threshold=0.1),
        lambda: ma.ablation_effect(MODEL, TOKENS, UNITS, None),
        lambda: ma.score_circuit(MODEL, [TOKENS], UNITS[:1], UNITS, None, "kl"),
    ],
)
def test_every_entry_point_checks_its_means(entry) -> None:
    with pytest.raises(ValueError, match=r"needs means \(got means=None\)"):
        entry()


@pytest.mark.parametrize("fast", [True, False])
def test_head_out_of_range_names_the_site(fast: bool) -> None:
    unit = "blocks.0.attn.hook_z[heads=7]"
    with pytest.raises(
        IndexError,
        match=r"site blocks\.0\.attn\.hook_z\[heads=7\]: head 7 out of range.* 2 heads",
    ):
        ma.sweep(MODEL, [TOKENS], [unit], MEANS, fast=fast)
    with pytest.raises(IndexError, match=r"neuron 12 out of range"):
        ma.sweep(MODEL, [TOKENS], ["blocks.1.mlp.hook_post[neurons=12]"], MEANS, fast=fast)


def test_a_batch_that_is_not_a_tensor_or_dict() -> None:
    with pytest.raises(TypeError, match=r"sweep: batches\[0\]: a batch is a tensor"):
        ma.sweep(MODEL, [[1, 2]], UNITS, MEANS)


def test_missing_site_in_means_is_key_and_value_error_before_any_hook() -> None:
    unit = "blocks.1.attn.hook_z[heads=0]"
    for kind in (MissingSiteError, KeyError, ValueError, MeanAblateError):
        with pytest.raises(kind, match=r"no mean for site 'blocks\.1\.attn\.hook_z'"):
            ma.ablation_effect(MODEL, TOKENS, unit, MEANS)
    with pytest.raises(ValueError, match="no mean for site"):
        ma.sweep(MODEL, [TOKENS], [unit], MEANS)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in MODEL.modules())


def test_transformer_lens_name_on_a_hf_model_says_the_module_path() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=4, vocab_size=20, n_positions=8)
    gpt2 = GPT2LMHeadModel(cfg).eval()
    with pytest.raises(ValueError) as err:
        ma.ablation_effect(
            gpt2,
            torch.zeros(1, 4, dtype=torch.long),
            "blocks.0.attn.hook_z[heads=1]",
            method="zero",
        )
    assert "transformer.h.0.attn.c_proj@input[heads=..;n_heads=4]" in str(err.value)
    with pytest.raises(
        ValueError, match=r"same activation is transformer\.h\.0\.mlp\.c_proj@input"
    ):
        ma.compute_means(gpt2, ["blocks.0.mlp.hook_post"], [torch.zeros(1, 4, dtype=torch.long)])
    # and the suggestion is right: it is the activation TL's hook_z sees, flattened
    ids = torch.randint(0, 20, (2, 4))
    with torch.no_grad():
        effect = ma.ablation_effect(
            gpt2, ids, "transformer.h.0.attn.c_proj@input[heads=1;n_heads=4]", method="zero"
        )
    assert effect.value > 0


def test_contract_types_are_builtin_subclasses() -> None:
    from meanablate import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, MeanAblateError)
        if cls is not MeanAblateError:
            assert issubclass(cls, CONTRACT), name
