"""Our HookedTransformer against TransformerLens on the same weights: equal logits and hooks.

TransformerLens 4 has no ``HookedTransformer``; its ``TransformerBridge`` wraps a module.
We wrap (1) a randomly initialised HF GPT-2 (``build_bridge_from_module``, offline) and
(2) TransformerLens's own ``NativeModel`` loaded with our weights (attention-only too),
and compare logits to 1e-5 and activations by hook name.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens.model_bridge")  # TransformerLens >= 4
transformers = pytest.importorskip("transformers")

from meanablate.adapters import transformer_lens as tla  # noqa: E402
from meanablate.organisms.transformer import HookedTransformer, TransformerConfig  # noqa: E402

ATOL = 1e-5
HOOKS = [
    "hook_embed",
    "hook_pos_embed",
    "blocks.0.hook_resid_pre",
    "blocks.0.ln1.hook_scale",
    "blocks.0.attn.hook_q",
    "blocks.0.attn.hook_k",
    "blocks.0.attn.hook_v",
    "blocks.0.attn.hook_pattern",
    "blocks.0.attn.hook_z",
    "blocks.0.hook_attn_out",
    "blocks.0.hook_resid_mid",
    "blocks.0.mlp.hook_pre",
    "blocks.0.mlp.hook_post",
    "blocks.0.hook_mlp_out",
    "blocks.1.hook_resid_pre",
    "blocks.1.attn.hook_pattern",
    "blocks.1.attn.hook_z",
    "blocks.1.mlp.hook_post",
    "blocks.1.hook_resid_post",
    "ln_final.hook_normalized",
]


def _randomize(module: torch.nn.Module, std: float, seed: int) -> None:
    """Every parameter ~ N(0, std), so that no bias or LayerNorm weight is trivially 0/1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _gpt2(tied: bool, seed: int = 0):
    cfg = transformers.GPT2Config(
        vocab_size=61,
        n_positions=24,
        n_embd=48,
        n_layer=2,
        n_head=4,
        activation_function="gelu_new",
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    _randomize(model, 0.15, seed)
    return model


def _cache_ours(model: HookedTransformer, tokens: torch.Tensor, names: list[str]):
    acts: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, o, n=n: acts.__setitem__(n, o.detach()))
        for n in names
    ]
    try:
        with torch.no_grad():
            logits = model(tokens)
    finally:
        for h in handles:
            h.remove()
    return logits, acts


def _tokens(vocab: int, n_pos: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (3, n_pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_bridge_logits_and_hooks_equal_ours(tied: bool) -> None:
    hf = _gpt2(tied)
    ours = tla.from_hf_gpt2(hf)
    bridge = tla.bridge_from_hf_gpt2(hf)
    tokens = _tokens(hf.config.vocab_size, 20)

    with torch.no_grad():
        hf_logits = hf(tokens).logits
        tl_logits, cache = bridge.run_with_cache(tokens)
    logits, acts = _cache_ours(ours, tokens, HOOKS)

    assert logits.shape == tl_logits.shape == (3, 20, hf.config.vocab_size)
    assert hf_logits.abs().max() > 0.5  # the comparison is not between near-zero logits
    torch.testing.assert_close(logits, tl_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, hf_logits, atol=ATOL, rtol=0)
    for name in HOOKS:
        assert name in cache, f"bridge has no {name}"
        ours_act = acts[name].expand_as(cache[name])  # our hook_pos_embed is [1, pos, d]
        torch.testing.assert_close(ours_act, cache[name], atol=ATOL, rtol=0, msg=name)


def test_from_bridge_equals_from_hf_and_roundtrip() -> None:
    hf = _gpt2(tied=False, seed=3)
    ours = tla.from_hf_gpt2(hf)
    via_tl = tla.from_transformer_bridge(tla.bridge_from_hf_gpt2(hf))
    assert via_tl.cfg == ours.cfg
    sd = ours.state_dict()
    for key, value in via_tl.state_dict().items():
        torch.testing.assert_close(value, sd[key], atol=0, rtol=0, msg=key)

    back = tla.to_hf_gpt2(ours)
    tokens = _tokens(hf.config.vocab_size, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, hf(tokens).logits, atol=ATOL, rtol=0)
    assert back.config.tie_word_embeddings is False


@pytest.mark.parametrize("normalization", [None, "LN"])
@pytest.mark.parametrize("d_mlp", [None, 40])
def test_native_bridge_equals_ours(normalization: str | None, d_mlp: int | None) -> None:
    cfg = TransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_vocab=23,
        n_ctx=16,
        d_mlp=d_mlp,
        act_fn="gelu",
        normalization=normalization,
    )  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = HookedTransformer(cfg).eval()
    _randomize(model, 0.1, seed=7)  # b_U != 0 too
    bridge = tla.to_transformer_bridge(model)
    tokens = _tokens(cfg.d_vocab, 16)
    names = [
        "blocks.0.attn.hook_pattern",
        "blocks.0.attn.hook_z",
        "blocks.1.hook_resid_pre",
        "blocks.1.attn.hook_z",
    ]
    if d_mlp is not None:
        names.append("blocks.0.mlp.hook_post")
    logits, acts = _cache_ours(model, tokens, names)
    with torch.no_grad():
        tl_logits, cache = bridge.run_with_cache(tokens)
    torch.testing.assert_close(logits, tl_logits, atol=ATOL, rtol=0)
    for name in names:
        torch.testing.assert_close(acts[name], cache[name], atol=ATOL, rtol=0, msg=name)
    again = tla.from_transformer_bridge(bridge)
    assert again.cfg == cfg
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_induction_organism_in_transformer_lens(dtype: torch.dtype) -> None:
    """The trained organism (logits up to ~30, saturated attention) in TransformerLens.

    float64 shows the two compute the same function (to 1e-9); in float32, rounding
    (~2e-6 at |logit| 30) is amplified by near-one-hot softmaxes (max diff ~6e-5 seen), so 5e-4.
    """
    from meanablate.organisms.induction import load_induction, make_batches

    model = load_induction().model.to(dtype)
    atol = 1e-9 if dtype == torch.float64 else 5e-4
    bridge = tla.to_transformer_bridge(model)
    tokens = make_batches(16, 16, 0)[0]["tokens"]
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(2)]
    logits, acts = _cache_ours(model, tokens, names)
    with torch.no_grad():
        tl_logits, cache = bridge.run_with_cache(tokens)
    assert tl_logits.dtype == dtype
    torch.testing.assert_close(logits, tl_logits, atol=atol, rtol=0)
    for name in names:
        torch.testing.assert_close(acts[name], cache[name], atol=atol, rtol=0, msg=name)


def test_gpt2_cannot_express_attention_only() -> None:
    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=4)
    with pytest.raises(ValueError, match="attention-only"):
        tla.to_hf_gpt2(HookedTransformer(cfg))
