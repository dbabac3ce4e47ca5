"""Convert weights between our :class:`HookedTransformer`, HF GPT-2 and TransformerLens.

Our :class:`~meanablate.organisms.transformer.HookedTransformer` uses TransformerLens's
weight names and shapes, so conversion is reshaping and transposing:

ours -> HF GPT-2 (``Conv1D`` weights are ``[in, out]``) -> TL ``NativeModel`` (``nn.Linear``
weights are ``[out, in]``), with ``h`` heads of ``dh``, model width ``d``:

- ``W_E [vocab, d]``: ``wte.weight``; ``tok_embed.weight`` (same shape);
- ``W_pos [n_ctx, d]``: ``wpe.weight``; ``pos.weight``;
- ``W_Q/W_K/W_V [h, d, dh]``: thirds of ``attn.c_attn.weight [d, 3*h*dh]``, columns
  head-major; ``attn.q/k/v.weight [h*dh, d]``;
- ``W_O [h, dh, d]``: ``attn.c_proj.weight [h*dh, d]``; ``attn.o.weight [d, h*dh]``;
- ``W_in [d, d_mlp]`` / ``W_out [d_mlp, d]``: ``mlp.c_fc`` / ``mlp.c_proj`` weights (same
  shapes); ``mlp.fc_in.weight [d_mlp, d]`` / ``mlp.fc_out.weight [d, d_mlp]``;
- ``W_U [d, vocab]``, ``b_U [vocab]``: ``lm_head.weight [vocab, d]`` (no bias: ``b_U``
  must be 0); ``head.weight [vocab, d]``, ``head.bias``;
- LayerNorm ``ln1/ln2/ln_final.w/b``: ``ln_1/ln_2/ln_f.weight/bias``;
  ``ln1/ln2/ln_out.weight/bias``.

TransformerLens 4 removed ``HookedTransformer``; its ``TransformerBridge`` wraps a
module (an HF model or TransformerLens's own ``NativeModel``) and exposes the TL hook
names (``blocks.{L}.attn.hook_z`` ...) and TL-format weights (``bridge.get_params()``).
Everything here works offline: :func:`bridge_from_hf_gpt2` wraps an HF model object you
built or loaded (``build_bridge_from_module``, no hub call, no tokenizer), and
:func:`to_transformer_bridge` builds a ``NativeModel`` bridge (also attention-only
models, which GPT-2 cannot express).

``transformers`` and ``transformer_lens`` are imported inside the functions that need
them (install the ``hf`` / ``transformer-lens`` extras).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from meanablate.organisms.transformer import HookedTransformer, TransformerConfig

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

__all__ = [
    "bridge_from_hf_gpt2",
    "config_from_hf_gpt2",
    "from_hf_gpt2",
    "from_transformer_bridge",
    "hf_gpt2_config",
    "state_dict_from_hf_gpt2",
    "state_dict_from_tl_params",
    "state_dict_to_hf_gpt2",
    "to_hf_gpt2",
    "to_transformer_bridge",
]

# Activation names (HF / TransformerLens) that equal ours: "gelu" is the tanh approximation.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def _act_from_external(name: str) -> str:
    name = (name or "").lower()
    if name in _TANH_GELU:
        return "gelu"
    if name == "relu":
        return "relu"
    raise ValueError(
        f"activation {name!r} has no equivalent here: our MLP supports 'relu' and the tanh "
        f"approximation of GELU ({' / '.join(_TANH_GELU)}); exact-erf 'gelu' differs"
    )


def _act_to_external(cfg: TransformerConfig) -> str:
    return "gelu_new" if cfg.act_fn == "gelu" else "relu"


# -- HF GPT-2 ----------------------------------------------------------------------------


def config_from_hf_gpt2(hf_config: GPT2Config) -> TransformerConfig:
    """Our config for an HF ``GPT2Config`` (``normalization="LN"``, causal, with MLPs)."""
    if not getattr(hf_config, "scale_attn_weights", True):
        raise ValueError("GPT-2 configs with scale_attn_weights=False are not supported")
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("GPT-2 configs with scale_attn_by_inverse_layer_idx are not supported")
    d_model, n_heads = int(hf_config.n_embd), int(hf_config.n_head)
    if d_model % n_heads:
        raise ValueError(f"n_embd={d_model} is not a multiple of n_head={n_heads}")
    return TransformerConfig(
        n_layers=int(hf_config.n_layer),
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_vocab=int(hf_config.vocab_size),
        n_ctx=int(hf_config.n_positions),
        d_mlp=int(hf_config.n_inner or 4 * d_model),
        act_fn=_act_from_external(hf_config.activation_function),  # type: ignore[arg-type]
        normalization="LN",
        causal=True,
        eps=float(hf_config.layer_norm_epsilon),
    )


def hf_gpt2_config(cfg: TransformerConfig, *, tie_word_embeddings: bool = False) -> GPT2Config:
    """An HF ``GPT2Config`` for our config (dropout off); raises if GPT-2 cannot express it.

    GPT-2 needs LayerNorm, MLPs, causal attention, ``n_heads * d_head == d_model`` and
    an output vocabulary equal to the input one.
    """
    from transformers import GPT2Config

    problems = []
    if cfg.normalization != "LN":
        problems.append("normalization must be 'LN'")
    if cfg.d_mlp is None:
        problems.append(
            "attention-only models have no GPT-2 equivalent (use to_transformer_bridge)"
        )
    if not cfg.causal:
        problems.append("GPT-2 is causal")
    if cfg.n_heads * cfg.d_head != cfg.d_model:
        problems.append("n_heads * d_head must equal d_model")
    if cfg.vocab_out != cfg.d_vocab:
        problems.append("d_vocab_out must equal d_vocab")
    if problems:
        raise ValueError("cannot express this model as GPT-2: " + "; ".join(problems))
    return GPT2Config(
        vocab_size=cfg.d_vocab,
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_mlp,
        activation_function=_act_to_external(cfg),
        layer_norm_epsilon=cfg.eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=None,
    )


def state_dict_from_hf_gpt2(
    hf_state: dict[str, Tensor], cfg: TransformerConfig
) -> dict[str, Tensor]:
    """Our state dict from a ``GPT2LMHeadModel`` state dict (keys ``transformer.*``,
    ``lm_head.weight``; a tied ``lm_head`` may be missing).

    ``c_attn.weight [d, 3*h*dh]`` splits into q, k, v ``[d, h*dh]`` whose columns are
    head-major, so ``W_Q = q.reshape(d, h, dh).permute(1, 0, 2)`` ``[h, d, dh]``;
    ``c_proj.weight [h*dh, d]`` is ``W_O.reshape(h*dh, d)``. ``b_U`` is zero (GPT-2's
    ``lm_head`` has no bias).
    """
    h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
    p = "transformer."
    out: dict[str, Tensor] = {
        "W_E": hf_state[p + "wte.weight"],
        "W_pos": hf_state[p + "wpe.weight"],
        "ln_final.w": hf_state[p + "ln_f.weight"],
        "ln_final.b": hf_state[p + "ln_f.bias"],
        "W_U": hf_state.get("lm_head.weight", hf_state[p + "wte.weight"]).T,
        "b_U": torch.zeros(cfg.vocab_out, dtype=hf_state[p + "wte.weight"].dtype),
    }
    for layer in range(cfg.n_layers):
        src, dst = f"{p}h.{layer}.", f"blocks.{layer}."
        w_q, w_k, w_v = hf_state[src + "attn.c_attn.weight"].split(h * dh, dim=1)
        b_q, b_k, b_v = hf_state[src + "attn.c_attn.bias"].split(h * dh, dim=0)
        for name, w, b in (("Q", w_q, b_q), ("K", w_k, b_k), ("V", w_v, b_v)):
            out[f"{dst}attn.W_{name}"] = w.reshape(d, h, dh).permute(1, 0, 2)
            out[f"{dst}attn.b_{name}"] = b.reshape(h, dh)
        out[dst + "attn.W_O"] = hf_state[src + "attn.c_proj.weight"].reshape(h, dh, d)
        out[dst + "attn.b_O"] = hf_state[src + "attn.c_proj.bias"]
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[f"{dst}{ours}.w"] = hf_state[f"{src}{theirs}.weight"]
            out[f"{dst}{ours}.b"] = hf_state[f"{src}{theirs}.bias"]
        out[dst + "mlp.W_in"] = hf_state[src + "mlp.c_fc.weight"]
        out[dst + "mlp.b_in"] = hf_state[src + "mlp.c_fc.bias"]
        out[dst + "mlp.W_out"] = hf_state[src + "mlp.c_proj.weight"]
        out[dst + "mlp.b_out"] = hf_state[src + "mlp.c_proj.bias"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def state_dict_to_hf_gpt2(state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """The inverse of :func:`state_dict_from_hf_gpt2` (``GPT2LMHeadModel`` keys).

    Raises if ``b_U`` is not zero: GPT-2's ``lm_head`` has no bias.
    """
    if state["b_U"].abs().max() > 0:
        raise ValueError("b_U is not zero; GPT-2's lm_head has no bias")
    h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
    p = "transformer."
    out: dict[str, Tensor] = {
        p + "wte.weight": state["W_E"],
        p + "wpe.weight": state["W_pos"],
        p + "ln_f.weight": state["ln_final.w"],
        p + "ln_f.bias": state["ln_final.b"],
        "lm_head.weight": state["W_U"].T,
    }
    for layer in range(cfg.n_layers):
        src, dst = f"blocks.{layer}.", f"{p}h.{layer}."
        out[dst + "attn.c_attn.weight"] = torch.cat(
            [state[f"{src}attn.W_{n}"].permute(1, 0, 2).reshape(d, h * dh) for n in "QKV"], dim=1
        )
        out[dst + "attn.c_attn.bias"] = torch.cat(
            [state[f"{src}attn.b_{n}"].reshape(h * dh) for n in "QKV"]
        )
        out[dst + "attn.c_proj.weight"] = state[src + "attn.W_O"].reshape(h * dh, d)
        out[dst + "attn.c_proj.bias"] = state[src + "attn.b_O"]
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[f"{dst}{theirs}.weight"] = state[f"{src}{ours}.w"]
            out[f"{dst}{theirs}.bias"] = state[f"{src}{ours}.b"]
        out[dst + "mlp.c_fc.weight"] = state[src + "mlp.W_in"]
        out[dst + "mlp.c_fc.bias"] = state[src + "mlp.b_in"]
        out[dst + "mlp.c_proj.weight"] = state[src + "mlp.W_out"]
        out[dst + "mlp.c_proj.bias"] = state[src + "mlp.b_out"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_hf_gpt2(hf_model: GPT2LMHeadModel) -> HookedTransformer:
    """Our :class:`HookedTransformer` with the weights of an HF ``GPT2LMHeadModel``.

    ``model(tokens)`` then equals ``hf_model(tokens).logits`` (``[batch, pos, vocab]``) up to
    float rounding, for inputs without padding.
    """
    cfg = config_from_hf_gpt2(hf_model.config)
    model = HookedTransformer(cfg)
    model.load_state_dict(state_dict_from_hf_gpt2(hf_model.state_dict(), cfg))
    return model.eval()


def to_hf_gpt2(model: HookedTransformer) -> GPT2LMHeadModel:
    """An HF ``GPT2LMHeadModel`` (eval mode) with ``model``'s weights.

    The embeddings are tied when ``W_U == W_E.T``. See :func:`hf_gpt2_config` for the
    models GPT-2 can express.
    """
    from transformers import GPT2LMHeadModel

    cfg = model.cfg
    state = model.state_dict()
    tied = torch.equal(state["W_U"].T, state["W_E"])
    hf_model = GPT2LMHeadModel(hf_gpt2_config(cfg, tie_word_embeddings=tied))
    hf_params = dict(hf_model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, value in state_dict_to_hf_gpt2(state, cfg).items():
            hf_params[key].copy_(value)
    return hf_model.eval()


def bridge_from_hf_gpt2(hf_model: GPT2LMHeadModel, *, copy_model: bool = True) -> TransformerBridge:
    """Wrap an HF GPT-2 model in a TransformerLens ``TransformerBridge``, offline.

    Uses ``build_bridge_from_module`` with the ``GPT2LMHeadModel`` adapter: no hub call
    and no tokenizer (``boot_transformers`` would fetch one). The bridge replaces the
    wrapped model's submodules, so by default it wraps a deep copy.
    """
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    module = copy.deepcopy(hf_model) if copy_model else hf_model
    bridge = build_bridge_from_module(
        module.eval(), "GPT2LMHeadModel", hf_config=module.config, model_name="gpt2-local"
    )
    return bridge.eval()


# -- TransformerLens (TransformerBridge) --------------------------------------------------

_TL_TOP = {
    "embed.W_E": "W_E",
    "pos_embed.W_pos": "W_pos",
    "unembed.W_U": "W_U",
    "unembed.b_U": "b_U",
}


def state_dict_from_tl_params(
    params: dict[str, Tensor], cfg: TransformerConfig
) -> dict[str, Tensor]:
    """Our state dict from TransformerLens-format params (``bridge.get_params()``).

    The names are the same but for the top-level ones (``embed.W_E`` -> ``W_E``,
    ``pos_embed.W_pos`` -> ``W_pos``, ``unembed.W_U`` / ``unembed.b_U`` -> ``W_U`` /
    ``b_U``); MLP entries are dropped for attention-only configs (TL reports zeros).
    """
    out = {}
    for key, value in params.items():
        key = _TL_TOP.get(key, key)
        if cfg.d_mlp is None and ".mlp." in key:
            continue
        if cfg.normalization is None and (".ln" in key or key.startswith("ln_final")):
            continue
        out[key] = value.detach().clone().contiguous()
    return out


def _config_from_bridge_cfg(tl_cfg: Any) -> TransformerConfig:
    norm = tl_cfg.normalization_type
    if norm not in (None, "LN"):
        raise ValueError(
            f"normalization_type={norm!r} is not supported (only 'LN' or None); "
            "convert before enable_compatibility_mode() folds LayerNorm"
        )
    unsupported = {
        "positional_embedding_type": (
            getattr(tl_cfg, "positional_embedding_type", "standard") or "standard"
        )
        != "standard",
        "gated_mlp": bool(getattr(tl_cfg, "gated_mlp", False)),
        "parallel_attn_mlp": bool(getattr(tl_cfg, "parallel_attn_mlp", False)),
        "n_key_value_heads": getattr(tl_cfg, "n_key_value_heads", None)
        not in (None, tl_cfg.n_heads),
        "attn_scale": bool(getattr(tl_cfg, "use_attn_scale", True))
        and getattr(tl_cfg, "attn_scale", -1.0) > 0
        and not math.isclose(tl_cfg.attn_scale, math.sqrt(tl_cfg.d_head)),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"unsupported TransformerLens config options: {', '.join(bad)}")
    attn_only = bool(tl_cfg.attn_only)
    d_vocab_out = int(tl_cfg.d_vocab_out) if int(tl_cfg.d_vocab_out or -1) > 0 else None
    return TransformerConfig(
        n_layers=int(tl_cfg.n_layers),
        d_model=int(tl_cfg.d_model),
        n_heads=int(tl_cfg.n_heads),
        d_head=int(tl_cfg.d_head),
        d_vocab=int(tl_cfg.d_vocab),
        n_ctx=int(tl_cfg.n_ctx),
        d_mlp=None if attn_only else int(tl_cfg.d_mlp),
        d_vocab_out=None if d_vocab_out == int(tl_cfg.d_vocab) else d_vocab_out,
        act_fn=_act_fn_of_bridge(tl_cfg.act_fn, attn_only),  # type: ignore[arg-type]
        normalization=norm,
        causal=getattr(tl_cfg, "attention_dir", "causal") == "causal",
        eps=float(tl_cfg.eps),
    )


def _act_fn_of_bridge(name: str | None, attn_only: bool) -> str:
    try:
        return _act_from_external(name or "")
    except ValueError:
        if attn_only:  # no MLP: the activation is never used
            return "relu"
        raise


def from_transformer_bridge(bridge: TransformerBridge) -> HookedTransformer:
    """Our :class:`HookedTransformer` with a ``TransformerBridge``'s weights.

    Reads ``bridge.cfg`` and the TL-format ``bridge.get_params()`` (``W_Q [h, d, dh]`` per
    block ...), so it works for any bridge of a standard GPT-2-like architecture (HF
    GPT-2, TL native). Use it on the raw bridge, before ``enable_compatibility_mode()``
    (which folds LayerNorm into ``LNPre``).
    """
    cfg = _config_from_bridge_cfg(bridge.cfg)
    model = HookedTransformer(cfg)
    model.load_state_dict(state_dict_from_tl_params(bridge.get_params(), cfg))
    return model.eval()


def _native_state_dict(state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Our state dict in TransformerLens ``NativeModel`` keys (``nn.Linear``: [out, in])."""
    h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
    out: dict[str, Tensor] = {
        "tok_embed.weight": state["W_E"],
        "pos.weight": state["W_pos"],
        "head.weight": state["W_U"].T,
        "head.bias": state["b_U"],
    }
    if cfg.normalization == "LN":
        out["ln_out.weight"], out["ln_out.bias"] = state["ln_final.w"], state["ln_final.b"]
    for layer in range(cfg.n_layers):
        src, dst = f"blocks.{layer}.", f"layers.{layer}."
        for n in "QKV":
            # W_Q [h, d, dh] -> q.weight [h*dh, d]
            out[f"{dst}attn.{n.lower()}.weight"] = (
                state[f"{src}attn.W_{n}"].permute(0, 2, 1).reshape(h * dh, d)
            )
            out[f"{dst}attn.{n.lower()}.bias"] = state[f"{src}attn.b_{n}"].reshape(h * dh)
        out[dst + "attn.o.weight"] = state[src + "attn.W_O"].reshape(h * dh, d).T
        out[dst + "attn.o.bias"] = state[src + "attn.b_O"]
        lns = ("ln1", "ln2") if cfg.d_mlp is not None else ("ln1",)
        if cfg.normalization == "LN":
            for ln in lns:
                out[f"{dst}{ln}.weight"] = state[f"{src}{ln}.w"]
                out[f"{dst}{ln}.bias"] = state[f"{src}{ln}.b"]
        if cfg.d_mlp is not None:
            out[dst + "mlp.fc_in.weight"] = state[src + "mlp.W_in"].T
            out[dst + "mlp.fc_in.bias"] = state[src + "mlp.b_in"]
            out[dst + "mlp.fc_out.weight"] = state[src + "mlp.W_out"].T
            out[dst + "mlp.fc_out.bias"] = state[src + "mlp.b_out"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def to_transformer_bridge(model: HookedTransformer) -> TransformerBridge:
    """A TransformerLens ``TransformerBridge`` (eval mode) computing the same function.

    Builds TransformerLens's own ``NativeModel`` (split q/k/v/o ``nn.Linear``,
    ``nn.LayerNorm`` or none, optional MLP) from a ``TransformerBridgeConfig``, loads our
    weights into it and wraps it with ``build_bridge_from_module``: offline, and it covers
    attention-only models. ``bridge(tokens)`` gives logits ``[batch, pos, vocab_out]``;
    ``bridge.run_with_cache(tokens)`` the TL hook names (``blocks.{L}.attn.hook_z``
    ``[batch, pos, head, d_head]``, ``blocks.{L}.attn.hook_pattern`` ``[batch, head, q, k]``).
    """
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformer_lens.model_bridge.sources.native import NativeModel

    cfg = model.cfg
    tl_cfg = TransformerBridgeConfig(
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        n_ctx=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        d_vocab_out=cfg.vocab_out,
        d_mlp=cfg.d_mlp,
        attn_only=cfg.d_mlp is None,
        act_fn=_act_to_external(cfg),
        normalization_type=cfg.normalization,
        eps=cfg.eps,
        attention_dir="causal" if cfg.causal else "bidirectional",
        init_weights=False,
    )
    with torch.random.fork_rng(devices=[]):  # NativeModel's default init uses the global RNG
        native = NativeModel(copy.deepcopy(tl_cfg))
        # GPT-2-style heads have no bias; ours has b_U (the bridge keeps an existing bias).
        native.head = nn.Linear(cfg.d_model, cfg.vocab_out, bias=True)
    ref = next(model.parameters())
    native.load_state_dict(_native_state_dict(model.state_dict(), cfg), strict=True)
    native = native.to(device=ref.device, dtype=ref.dtype).eval()
    bridge = build_bridge_from_module(
        native, "TransformerLensNative", tl_config=tl_cfg, model_name="meanablate"
    )
    return bridge.eval()
