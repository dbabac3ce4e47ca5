"""Held-out Hugging Face architectures and a reference for them written with plain hooks.

Shared by ``tests/integration/test_heldout_families*.py``: ``ARCHS`` (tiny random configs of
architectures no family describes, and their heads / neurons / MLP / block modules, written
out by hand), the batches, and the reference: means averaged by hand over the real tokens,
replacements by ``register_forward_pre_hook`` / ``register_forward_hook``, metrics written
out.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from meanablate.families import family_of

transformers = pytest.importorskip("transformers")

VOCAB, B, P, NH = 40, 3, 5, 4
METRICS = ("kl", "logit_diff", "loss", "accuracy")
_L = dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=NH, intermediate_size=24)
_L.update(max_position_embeddings=16)
_LLAMA_UNITS = ("model.layers.{L}.self_attn.o_proj", ("model.layers.{L}.mlp.down_proj", "in"))

# name -> (config class, model class, config kwargs, heads module, (neuron module, io),
#          MLP module, block)
ARCHS: dict[str, tuple] = {
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_layer=2, n_embd=16, n_head=NH, rotary_dim=4),
             "transformer.h.{L}.attn.out_proj", ("transformer.h.{L}.mlp.act", "out"),
             "transformer.h.{L}.mlp", "transformer.h.{L}"),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=NH, ffn_dim=24,
                 word_embed_proj_dim=16),
            "model.decoder.layers.{L}.self_attn.out_proj", ("model.decoder.layers.{L}.fc2", "in"),
            "model.decoder.layers.{L}.fc2", "model.decoder.layers.{L}"),
    "gptneo": ("GPTNeoConfig", "GPTNeoForCausalLM",
               dict(num_layers=2, hidden_size=16, num_heads=NH, intermediate_size=24,
                    attention_types=[[["global", "local"], 1]], window_size=3),
               "transformer.h.{L}.attn.attention.out_proj", ("transformer.h.{L}.mlp.act", "out"),
               "transformer.h.{L}.mlp", "transformer.h.{L}"),
    "phi": ("PhiConfig", "PhiForCausalLM", _L, "model.layers.{L}.self_attn.dense",
            ("model.layers.{L}.mlp.fc2", "in"), "model.layers.{L}.mlp", "model.layers.{L}"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_L, num_key_value_heads=2, pad_token_id=0),
             *_LLAMA_UNITS, "model.layers.{L}.mlp", "model.layers.{L}"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_L, num_key_value_heads=1, head_dim=8),
              *_LLAMA_UNITS, "model.layers.{L}.mlp", "model.layers.{L}"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_L, num_key_value_heads=2, head_dim=4),
               *_LLAMA_UNITS, "model.layers.{L}.mlp", "model.layers.{L}"),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=NH),
               "transformer.h.{L}.self_attention.dense",
               ("transformer.h.{L}.mlp.dense_4h_to_h", "in"), "transformer.h.{L}.mlp",
               "transformer.h.{L}"),
    "falcon_alibi": ("FalconConfig", "FalconForCausalLM",
                     dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=NH, alibi=True,
                          parallel_attn=False),
                     "transformer.h.{L}.self_attention.dense",
                     ("transformer.h.{L}.mlp.dense_4h_to_h", "in"), "transformer.h.{L}.mlp",
                     "transformer.h.{L}"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=2, hidden_size=16, n_head=NH),
              "transformer.h.{L}.self_attention.dense",
              ("transformer.h.{L}.mlp.dense_4h_to_h", "in"), "transformer.h.{L}.mlp",
              "transformer.h.{L}"),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM",
                dict(n_layer=2, n_embd=16, n_head=NH, rotary_dim=4, n_ctx=16),
                "transformer.h.{L}.attn.out_proj", ("transformer.h.{L}.mlp.act", "out"),
                "transformer.h.{L}.mlp", "transformer.h.{L}"),
    "bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                dict(n_layer=2, n_embd=16, n_head=NH, multi_query=True),
                "transformer.h.{L}.attn.c_proj", ("transformer.h.{L}.mlp.act", "out"),
                "transformer.h.{L}.mlp", "transformer.h.{L}"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_L, num_key_value_heads=2), *_LLAMA_UNITS,
              "model.layers.{L}.mlp", "model.layers.{L}"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_L, num_key_value_heads=2, head_dim=4),
              *_LLAMA_UNITS, "model.layers.{L}.mlp", "model.layers.{L}"),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(_L, num_key_value_heads=2, sliding_window=3), *_LLAMA_UNITS,
                "model.layers.{L}.mlp", "model.layers.{L}"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(_L, num_key_value_heads=2),
                 *_LLAMA_UNITS, "model.layers.{L}.mlp", "model.layers.{L}"),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", _L, *_LLAMA_UNITS, "model.layers.{L}.mlp",
             "model.layers.{L}"),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(_L, residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=3.0),
                *_LLAMA_UNITS, "model.layers.{L}.mlp", "model.layers.{L}"),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_L, logit_scale=0.5), *_LLAMA_UNITS,
               "model.layers.{L}.mlp", "model.layers.{L}"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(_L, num_key_value_heads=2),
                   "model.layers.{L}.self_attn.o_proj", ("model.layers.{L}.mlp.c_proj", "in"),
                   "model.layers.{L}.mlp", "model.layers.{L}"),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(_L, pad_token_id=1),
                "roberta.encoder.layer.{L}.attention.output.dense",
                ("roberta.encoder.layer.{L}.intermediate", "out"),
                "roberta.encoder.layer.{L}.output.dense", "roberta.encoder.layer.{L}"),
    "electra": ("ElectraConfig", "ElectraForMaskedLM", dict(_L, embedding_size=8),
                "electra.encoder.layer.{L}.attention.output.dense",
                ("electra.encoder.layer.{L}.intermediate", "out"),
                "electra.encoder.layer.{L}.output.dense", "electra.encoder.layer.{L}"),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM",
                   dict(n_layers=2, dim=16, n_heads=NH, hidden_dim=24),
                   "distilbert.transformer.layer.{L}.attention.out_lin",
                   ("distilbert.transformer.layer.{L}.ffn.activation", "out"),
                   "distilbert.transformer.layer.{L}.ffn", "distilbert.transformer.layer.{L}"),
}  # fmt: skip
# OPT's fc1/fc2 see [batch * pos, d]: padding cannot be told apart there (refused, tested
# below), so its matrix runs unpadded.
UNPADDED = {"opt"}
LLAMA_NAMED = {"gemma", "qwen3", "olmo", "granite", "qwen2", "mistral"}
RESUMED = {"qwen2", "mistral"}


def _available(name: str) -> bool:
    return all(hasattr(transformers, c) for c in ARCHS[name][:2])


PARAMS = [
    pytest.param(n, marks=pytest.mark.skipif(not _available(n), reason="not in transformers"))
    for n in ARCHS
]


@cache
def _model(name: str) -> nn.Module:
    cfg_cls, model_cls, kwargs = ARCHS[name][:3]
    cfg = getattr(transformers, cfg_cls)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _units(name: str) -> dict[str, tuple[str, str, tuple]]:
    """unit -> (module, "in"/"out", selection), written out by hand."""
    heads, (neurons, io), mlp, block = ARCHS[name][3:]
    named = family_of(_model(name)).name != "generic"  # n_heads from the config
    view = "" if named else f";n_heads={NH}"
    suffix = "@input" if io == "in" else ""
    return {
        f"{heads.format(L=0)}@input[heads=1{view}]": (heads.format(L=0), "in", ("head", 1)),
        f"{neurons.format(L=1)}{suffix}[neurons=3]": (neurons.format(L=1), io, ("neuron", 3)),
        mlp.format(L=0): (mlp.format(L=0), "out", ("all",)),
        f"{block.format(L=1)}@input[pos=2]": (block.format(L=1), "in", ("pos", 2)),
    }


def _batch(seed: int, padded: bool) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, P), generator=gen)
    lengths = torch.tensor([P, P - 1, P - 2]) if padded else torch.full((B,), P)
    rows, at = torch.arange(B), lengths - 1
    target, wrong = torch.full((B, P), -100), torch.full((B, P), -100)
    target[rows, at] = torch.randint(0, VOCAB, (B,), generator=gen)
    shift = 1 + torch.randint(0, VOCAB - 1, (B,), generator=gen)
    wrong[rows, at] = (target[rows, at] + shift) % VOCAB
    amask = (torch.arange(P)[None] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": amask, "target": target, "wrong": wrong}


@cache
def _batches(name: str) -> list[dict[str, Tensor]]:
    return [_batch(s, name not in UNPADDED) for s in (1, 2)]


# -- the reference: plain torch hooks -----------------------------------------------------------
def _run(model: nn.Module, batch: dict) -> Tensor:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits


def _grab(model: nn.Module, module: str, io: str, batch: dict) -> Tensor:
    seen: list[Tensor] = []
    mod = model.get_submodule(module)
    if io == "in":
        h = mod.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().clone()))
    else:

        def post(_m: nn.Module, _a: Any, out: Any) -> None:
            seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())

        h = mod.register_forward_hook(post)
    try:
        _run(model, batch)
    finally:
        h.remove()
    assert len(seen) == 1
    return seen[0]


@cache
def _ref_mean(name: str, module: str, io: str) -> Tensor:
    model, total, count = _model(name), 0.0, 0.0
    for batch in _batches(name):
        act = _grab(model, module, io, batch).double()
        if act.ndim == 2:  # [batch * pos, d], unpadded
            total, count = total + act.sum(0), count + act.shape[0]
            continue
        keep = batch["attention_mask"].bool()
        total, count = total + act[keep].sum(0), count + keep.sum()
    return total / count


def _replace(x: Tensor, fill: Tensor, sel: tuple) -> Tensor:
    new = x.clone()
    if sel[0] == "all":
        new[...] = fill
    elif sel[0] == "neuron":
        new[..., sel[1]] = fill[..., sel[1]]
    elif sel[0] == "head":
        view = new.view(*new.shape[:-1], NH, -1)
        view[..., sel[1], :] = fill.reshape(view.shape)[..., sel[1], :]
    else:
        new[:, sel[1]] = fill[:, sel[1]]
    return new


def _ref_logits(name: str, units: list[str], method: str, batch: dict) -> Tensor:
    model, table = _model(name), _units(name)
    handles = []
    try:
        for unit in units:
            module, io, sel = table[unit]
            mean = _ref_mean(name, module, io) if method == "mean" else None

            def fill(x: Tensor, mean: Tensor | None = mean) -> Tensor:
                return torch.zeros_like(x) if mean is None else mean.to(x.dtype).expand_as(x)

            mod = model.get_submodule(module)
            if io == "in":

                def pre(_m: nn.Module, args: tuple, fill=fill, sel=sel) -> tuple:
                    return (_replace(args[0], fill(args[0]), sel), *args[1:])

                handles.append(mod.register_forward_pre_hook(pre))
            else:

                def post(_m: nn.Module, _a: Any, out: Any, fill=fill, sel=sel) -> Any:
                    x = out[0] if isinstance(out, tuple) else out
                    new = _replace(x, fill(x), sel)
                    return (new, *out[1:]) if isinstance(out, tuple) else new

                handles.append(mod.register_forward_hook(post))
        return _run(model, batch)
    finally:
        for h in handles:
            h.remove()


def _ref_metric(metric: str, z: Tensor, clean: Tensor, batch: dict) -> Tensor:
    scored = batch["target"] != -100
    t, w = batch["target"].clamp(min=0), batch["wrong"].clamp(min=0)
    zd, zc = z.double(), clean.double()
    if metric == "kl":
        lq, lp = zc.log_softmax(-1), zd.log_softmax(-1)
        per_pos = (lq.exp() * (lq - lp)).sum(-1)
    elif metric == "logit_diff":
        per_pos = zd.gather(-1, t[..., None])[..., 0] - zd.gather(-1, w[..., None])[..., 0]
    elif metric == "loss":
        per_pos = -zd.log_softmax(-1).gather(-1, t[..., None])[..., 0]
    else:
        per_pos = (z.argmax(-1) == batch["target"]).double()
    return (per_pos * scored).sum(1) / scored.sum(1)


def _ref_effect(metric: str, z: Tensor, clean: Tensor, batch: dict) -> Tensor:
    value = _ref_metric(metric, z, clean, batch)
    return value if metric == "kl" else value - _ref_metric(metric, clean, clean, batch)


def _check(metric: str, got: Tensor, want: Tensor, what: str) -> None:
    got = got.detach().double()
    if metric == "accuracy":
        assert torch.equal(got, want), (what, got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=what)
