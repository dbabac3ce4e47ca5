"""Sites and batches for Hugging Face ``transformers`` models (GPT-2, BERT).

Site helpers name the activations researchers ablate most, so nobody has to remember
that a GPT-2 head lives in the *input* of ``attn.c_proj``:

- ``gpt2_head_site``: input of ``transformer.h.{L}.attn.c_proj``,
  ``[batch, pos, n_heads * d_head]`` viewed as ``[batch, pos, n_heads, d_head]``;
- ``gpt2_neuron_site``: output of ``transformer.h.{L}.mlp.act``, ``[batch, pos, d_mlp]``;
- ``gpt2_resid_site``: input of ``transformer.h.{L}`` (the residual stream before block
  ``L``), ``[batch, pos, d_model]``;
- ``bert_head_site``: input of ``bert.encoder.layer.{L}.attention.output.dense``,
  ``[batch, pos, n_heads * d_head]``;
- ``bert_neuron_site``: output of ``bert.encoder.layer.{L}.intermediate``,
  ``[batch, pos, intermediate_size]``.

The ``prefix`` argument is the path of the base model inside the one you run:
``"transformer"`` for ``GPT2LMHeadModel``, ``"bert"`` for ``BertForMaskedLM``, ``""`` for a
bare ``GPT2Model`` / ``BertModel``.

:func:`batches_from_texts` turns texts into padded tokenizer-style dict batches
(``input_ids`` / ``attention_mask`` ``[batch, pos]``) that :func:`meanablate.compute_means`
reads with padding excluded. ``transformers`` is imported only by the functions that
need it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meanablate.sites import Site

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "batches_from_texts",
    "bert_head_site",
    "bert_neuron_site",
    "gpt2_head_site",
    "gpt2_head_units",
    "gpt2_neuron_site",
    "gpt2_resid_site",
    "load_tokenizer",
    "n_heads_of",
]


def _path(prefix: str, rest: str) -> str:
    return f"{prefix}.{rest}" if prefix else rest


def _layer(layer: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be an int >= 0, got {layer!r}")
    return layer


def _units(units: int | Iterable[int] | None) -> tuple[int, ...] | None:
    if units is None:
        return None
    if isinstance(units, int):
        return (units,)
    return tuple(units)


def gpt2_head_site(
    layer: int,
    heads: int | Iterable[int],
    n_heads: int,
    *,
    prefix: str = "transformer",
) -> Site:
    """Attention heads of GPT-2 block ``layer``: the input of ``attn.c_proj``.

    That input is the heads' outputs concatenated, ``[batch, pos, n_heads * d_head]``;
    the site views it as ``[batch, pos, n_heads, d_head]`` and selects ``heads``.

    >>> str(gpt2_head_site(1, [0, 3], n_heads=4))
    'transformer.h.1.attn.c_proj@input[heads=0,3;n_heads=4]'
    """
    return Site(
        _path(prefix, f"h.{_layer(layer)}.attn.c_proj"),
        heads=_units(heads),
        n_heads=n_heads,
        io="input",
    )


def gpt2_head_units(n_layers: int, n_heads: int, *, prefix: str = "transformer") -> list[Site]:
    """One site per head of every layer (candidate units for circuit discovery).

    >>> for site in gpt2_head_units(2, 1):
    ...     print(site)
    transformer.h.0.attn.c_proj@input[heads=0;n_heads=1]
    transformer.h.1.attn.c_proj@input[heads=0;n_heads=1]
    """
    return [
        gpt2_head_site(layer, head, n_heads, prefix=prefix)
        for layer in range(n_layers)
        for head in range(n_heads)
    ]


def gpt2_neuron_site(
    layer: int, neurons: int | Iterable[int] | None = None, *, prefix: str = "transformer"
) -> Site:
    """MLP neurons of GPT-2 block ``layer``: the output of ``mlp.act`` ``[batch, pos, d_mlp]``.

    ``neurons=None`` selects the whole MLP layer.

    >>> str(gpt2_neuron_site(0, [5, 7]))
    'transformer.h.0.mlp.act[neurons=5,7]'
    """
    return Site(_path(prefix, f"h.{_layer(layer)}.mlp.act"), neurons=_units(neurons))


def gpt2_resid_site(
    layer: int, positions: int | Iterable[int] | None = None, *, prefix: str = "transformer"
) -> Site:
    """The residual stream entering GPT-2 block ``layer`` ``[batch, pos, d_model]``.

    ``positions`` selects token positions (``None``: all of them).

    >>> str(gpt2_resid_site(1, positions=2))
    'transformer.h.1@input[pos=2]'
    """
    return Site(_path(prefix, f"h.{_layer(layer)}"), positions=_units(positions), io="input")


def bert_neuron_site(
    layer: int, neurons: int | Iterable[int] | None = None, *, prefix: str = "bert"
) -> Site:
    """Feed-forward neurons of BERT layer ``layer``: the output of ``intermediate``.

    ``BertIntermediate`` returns ``act(dense(x))``, ``[batch, pos, intermediate_size]``.

    >>> str(bert_neuron_site(1, 3))
    'bert.encoder.layer.1.intermediate[neurons=3]'
    """
    path = _path(prefix, f"encoder.layer.{_layer(layer)}.intermediate")
    return Site(path, neurons=_units(neurons))


def bert_head_site(
    layer: int, heads: int | Iterable[int], n_heads: int, *, prefix: str = "bert"
) -> Site:
    """Attention heads of BERT layer ``layer``: the input of ``attention.output.dense``.

    That input is the heads' context vectors concatenated, ``[batch, pos, n_heads * d_head]``.

    >>> str(bert_head_site(0, 1, n_heads=2, prefix=""))
    'encoder.layer.0.attention.output.dense@input[heads=1;n_heads=2]'
    """
    return Site(
        _path(prefix, f"encoder.layer.{_layer(layer)}.attention.output.dense"),
        heads=_units(heads),
        n_heads=n_heads,
        io="input",
    )


def n_heads_of(model_or_config: Any) -> int:
    """Attention heads per layer of an HF model or config (``n_head``, ``num_attention_heads``)."""
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("n_head", "num_attention_heads", "n_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot find the number of heads in {type(config).__name__}")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory (``save_pretrained`` output), never from the hub."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"no tokenizer directory at {path}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def batches_from_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int,
    *,
    max_length: int | None = None,
    padding_side: str | None = None,
) -> list[dict[str, Tensor]]:
    """Tokenize ``texts`` into padded dict batches, in order.

    Each batch holds ``batch_size`` texts (the last may hold fewer), padded to its own
    longest text: ``input_ids [batch, pos]`` and ``attention_mask [batch, pos]`` (1 =
    real token, 0 = padding), plus whatever else the tokenizer returns (BERT's
    ``token_type_ids``). ``max_length`` truncates longer texts. ``padding_side``
    (``"right"``/``"left"``) overrides the tokenizer's; note that per-position means
    read position ``i`` as the ``i``-th slot, so left padding shifts real tokens.

    A tokenizer without a pad token (GPT-2's) is refused: set one first, e.g.
    ``tokenizer.pad_token = tokenizer.eos_token``.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty sequence of strings")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if padding_side not in (None, "right", "left"):
        raise ValueError(f"padding_side must be 'right', 'left' or None, got {padding_side!r}")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no pad token, so batches cannot be padded; "
            "set one first, e.g. tokenizer.pad_token = tokenizer.eos_token"
        )
    kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt"}
    if max_length is not None:
        kwargs.update(truncation=True, max_length=max_length)
    old_side = tokenizer.padding_side
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    try:
        batches = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], **kwargs)
            batches.append({k: v for k, v in enc.items()})
    finally:
        tokenizer.padding_side = old_side
    return batches
