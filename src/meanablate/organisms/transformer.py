"""A small pure-PyTorch transformer with TransformerLens-style hook names.

Light enough to ship as the built-in organisms (no TransformerLens or JAX needed), and
structured like TransformerLens's ``HookedTransformer`` so that sites read the same:
``blocks.{L}.attn.hook_z`` ``[batch, pos, head, d_head]``, ``blocks.{L}.mlp.hook_post``
``[batch, pos, d_mlp]``, ``blocks.{L}.hook_resid_pre`` ``[batch, pos, d_model]``, ...

Weights use TransformerLens's names and shapes (``W_Q [head, d_model, d_head]``,
``W_O [head, d_head, d_model]``, ``W_in [d_model, d_mlp]``, ``W_U [d_model, d_vocab]``),
so converting to and from TransformerLens or tracr is a matter of copying tensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["HookPoint", "HookedTransformer", "TransformerConfig", "load_model", "save_model"]


class HookPoint(nn.Identity):
    """An identity module: a named place whose output hooks can read and replace."""


@dataclass(frozen=True)
class TransformerConfig:
    """Shape and options of a :class:`HookedTransformer` (``d_mlp=None``: attention only)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int
    d_mlp: int | None = None
    d_vocab_out: int | None = None
    act_fn: Literal["relu", "gelu"] = "relu"
    normalization: Literal["LN"] | None = None
    causal: bool = True
    eps: float = 1e-5

    def __post_init__(self) -> None:
        for field in ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"TransformerConfig.{field} must be >= 1")
        if self.act_fn not in ("relu", "gelu"):
            raise ValueError(f"act_fn must be 'relu' or 'gelu', got {self.act_fn!r}")
        if self.normalization not in (None, "LN"):
            raise ValueError(f"normalization must be None or 'LN', got {self.normalization!r}")

    @property
    def vocab_out(self) -> int:
        return self.d_vocab_out if self.d_vocab_out is not None else self.d_vocab


class LayerNorm(nn.Module):
    """TransformerLens's LayerNorm (``hook_scale``, ``hook_normalized``)."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale) * self.w + self.b


class Attention(nn.Module):
    """Multi-head attention with per-head weights and TransformerLens hook points."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.cfg = cfg
        self.W_Q = nn.Parameter(torch.empty(h, d, dh))
        self.W_K = nn.Parameter(torch.empty(h, d, dh))
        self.W_V = nn.Parameter(torch.empty(h, d, dh))
        self.W_O = nn.Parameter(torch.empty(h, dh, d))
        self.b_Q = nn.Parameter(torch.zeros(h, dh))
        self.b_K = nn.Parameter(torch.zeros(h, dh))
        self.b_V = nn.Parameter(torch.zeros(h, dh))
        self.b_O = nn.Parameter(torch.zeros(d))
        for w in (self.W_Q, self.W_K, self.W_V, self.W_O):
            nn.init.normal_(w, std=0.02)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()
        self.hook_result = HookPoint()

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``x [batch, pos, d_model]`` -> ``[batch, pos, d_model]``.

        ``key_mask [batch, pos]`` (1 = real token) keeps padding out of every query's keys.
        """
        q = self.hook_q(torch.einsum("bpd,hde->bphe", x, self.W_Q) + self.b_Q)
        k = self.hook_k(torch.einsum("bpd,hde->bphe", x, self.W_K) + self.b_K)
        v = self.hook_v(torch.einsum("bpd,hde->bphe", x, self.W_V) + self.b_V)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / self.cfg.d_head**0.5
        n = x.shape[1]
        if self.cfg.causal:
            future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1).nan_to_num(0.0))
        z = self.hook_z(torch.einsum("bhqk,bkhe->bqhe", pattern, v))
        return self.head_outputs_to_resid(z)

    def head_outputs_to_resid(self, z: Tensor) -> Tensor:
        """``z [batch, pos, head, d_head]`` -> the layer's output ``[batch, pos, d_model]``."""
        if self.hook_result._forward_hooks or self.hook_result._forward_pre_hooks:
            result = self.hook_result(torch.einsum("bphe,hed->bphd", z, self.W_O))
            return result.sum(dim=2) + self.b_O
        return torch.einsum("bphe,hed->bpd", z, self.W_O) + self.b_O


class MLP(nn.Module):
    """``W_in``/``W_out`` MLP with ``hook_pre`` and ``hook_post`` ``[batch, pos, d_mlp]``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        assert cfg.d_mlp is not None
        self.act_fn = cfg.act_fn
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        nn.init.normal_(self.W_in, std=0.02)
        nn.init.normal_(self.W_out, std=0.02)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        if self.act_fn == "relu":
            post = torch.relu(pre)
        else:
            post = nn.functional.gelu(pre, approximate="tanh")
        return self.hook_post(post) @ self.W_out + self.b_out


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        norm = cfg.normalization == "LN"
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps) if norm else nn.Identity()
        self.attn = Attention(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_in = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_post = HookPoint()
        if cfg.d_mlp is not None:
            self.ln2 = LayerNorm(cfg.d_model, cfg.eps) if norm else nn.Identity()
            self.mlp = MLP(cfg)
            self.hook_resid_mid = HookPoint()
            self.hook_mlp_in = HookPoint()
            self.hook_mlp_out = HookPoint()

    def forward(self, resid: Tensor, key_mask: Tensor | None = None) -> Tensor:
        resid = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(self.hook_attn_in(self.ln1(resid)), key_mask))
        resid = resid + attn_out
        if hasattr(self, "mlp"):
            resid = self.hook_resid_mid(resid)
            mlp_out = self.hook_mlp_out(self.mlp(self.hook_mlp_in(self.ln2(resid))))
            resid = resid + mlp_out
        return self.hook_resid_post(resid)


class HookedTransformer(nn.Module):
    """A decoder (or, with ``causal=False``, encoder) transformer with hook points.

    ``forward(tokens [batch, pos], attention_mask [batch, pos] | None)`` returns logits
    ``[batch, pos, d_vocab_out]``. :meth:`run_from` resumes from the residual stream
    before a given layer, which is what makes exact sweeps cheap.

    >>> cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=6)
    >>> HookedTransformer(cfg)(torch.zeros(2, 3, dtype=torch.long)).shape
    torch.Size([2, 3, 5])
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.randn(cfg.d_vocab, cfg.d_model) * 0.02)
        self.W_pos = nn.Parameter(torch.randn(cfg.n_ctx, cfg.d_model) * 0.02)
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model, cfg.eps) if cfg.normalization else nn.Identity()
        self.W_U = nn.Parameter(torch.randn(cfg.d_model, cfg.vocab_out) * 0.02)
        self.b_U = nn.Parameter(torch.zeros(cfg.vocab_out))

    def embed(self, tokens: Tensor) -> Tensor:
        """``tokens [batch, pos]`` -> residual stream before block 0 ``[batch, pos, d_model]``."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds n_ctx={self.cfg.n_ctx}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab):
            raise IndexError(
                f"token ids must lie in [0, {self.cfg.d_vocab}), got "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )
        pos = self.W_pos[: tokens.shape[1]].unsqueeze(0)
        return self.hook_embed(self.W_E[tokens]) + self.hook_pos_embed(pos)

    def unembed(self, resid: Tensor) -> Tensor:
        """``resid [..., d_model]`` -> logits ``[..., d_vocab_out]``."""
        return self.ln_final(resid) @ self.W_U + self.b_U

    def run_from(
        self, resid: Tensor, start_layer: int, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Run blocks ``start_layer..`` on ``resid [batch, pos, d_model]`` and unembed."""
        for block in self.blocks[start_layer:]:
            resid = block(resid, attention_mask)
        return self.unembed(resid)

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.run_from(self.embed(tokens), 0, attention_mask)


def save_model(model: HookedTransformer, path: str | Path, extra: dict | None = None) -> None:
    """Save weights as safetensors with the config (and ``extra``) in its metadata."""
    from safetensors.torch import save_file

    meta = {"config": json.dumps(asdict(model.cfg)), "format": "meanablate.HookedTransformer"}
    if extra:
        meta["extra"] = json.dumps(extra)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)


def load_model(path: str | Path) -> HookedTransformer:
    """Load a :class:`HookedTransformer` saved by :func:`save_model` (no pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "meanablate.HookedTransformer":
        raise ValueError(f"{path} is not a meanablate HookedTransformer file (metadata {meta})")
    model = HookedTransformer(TransformerConfig(**json.loads(meta["config"])))
    model.load_state_dict(load_file(str(path)))
    return model.eval()
