"""Hugging Face models (``--model DIR``, loaded offline) and their units: heads, MLPs,
neurons, layers and positions of GPT-2, BERT and Llama-style models (:func:`hf_units`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meanablate.cli.errors import one_line
from meanablate.cli.prompts import read_prompts
from meanablate.cli.records import Inputs, Log, default_metric
from meanablate.config import InputError, Resolved

__all__ = ["hf_units", "load_hf"]


def _offline(auto: Any, path: str, what: str) -> Any:
    """``auto.from_pretrained(path)`` from local files; a failure is one line naming ``what``."""
    try:
        return auto.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise InputError(
            f"--model {path}: {what} ({type(exc).__name__}: {one_line(exc)})"
        ) from None


def load_hf(cfg: Resolved, path: str, log: Log) -> Inputs:
    """A local Hugging Face model directory (offline) with the ``--prompts`` file's batches."""
    # Everything that can be wrong with the input is checked before the (slow) model load:
    # the directory, the tokenizer, every line of the prompts file.
    if not Path(path, "config.json").is_file():
        raise InputError(f"--model {path}: not a Hugging Face model directory (no config.json)")
    if not cfg["prompts"]:
        raise InputError(f"--model {path} needs --prompts FILE (text lines or JSONL)")
    try:
        import transformers
    except ImportError:
        raise InputError("--model DIR needs transformers: pip install 'meanablate[hf]'") from None
    # -q: transformers' own logs and progress bars are silenced by the session
    # (meanablate.cli.errors.quiet_libraries), and put back as they were after the run.
    config = _offline(transformers.AutoConfig, path, "cannot read config.json")
    tokenizer = _offline(transformers.AutoTokenizer, path, "cannot load its tokenizer")
    max_len = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", None
    )
    batches = read_prompts(cfg["prompts"], tokenizer, cfg["batch_size"], cfg["n_examples"], max_len)
    model = None
    errors = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            model = auto.from_pretrained(path, local_files_only=True)
            break
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {one_line(exc)}")
    if model is None:
        raise InputError(f"--model {path}: cannot load the model ({errors[-1]})")
    model.eval()
    log(f"{path}: {type(model).__name__}, {len(batches)} batches of prompts")
    has_logits = hasattr(model, "get_output_embeddings") and model.get_output_embeddings()
    metric = default_metric(batches[0])
    if metric == "kl" and not has_logits:
        metric = "l2"  # a bare encoder: compare hidden states
    units = None if cfg["units"] else hf_units(model, "components", None, batches[0])
    return Inputs(
        name=Path(path).resolve().name,
        model=model,
        batches=batches,
        units=units or [],
        metric=metric,
        ground_truth=None,
        per_position=False,
        source="huggingface",
        description=f"{type(model).__name__} from {path}",
        versions={"transformers": transformers.__version__},
    )


# (block, head-output input, MLP output, neuron activation, attention output) per family,
# relative to the base model: GPT-2, BERT, Llama / Mistral / Qwen.
_HF_LAYOUTS = (
    ("h.{L}", "h.{L}.attn.c_proj@input", "h.{L}.mlp", "h.{L}.mlp.act", "h.{L}.attn"),
    (
        "encoder.layer.{L}",
        "encoder.layer.{L}.attention.output.dense@input",
        "encoder.layer.{L}.output.dense",
        "encoder.layer.{L}.intermediate",
        "encoder.layer.{L}.attention.output.dense",
    ),
    (
        "layers.{L}",
        "layers.{L}.self_attn.o_proj@input",
        "layers.{L}.mlp",
        "layers.{L}.mlp.down_proj@input",
        "layers.{L}.self_attn",
    ),
)


def _hf_layout(model: nn.Module) -> tuple[str, tuple[str, ...], int] | None:
    names = {name for name, _ in model.named_modules()}
    for layout in _HF_LAYOUTS:
        block0 = layout[0].format(L=0)
        for name in sorted(names, key=len):
            if name != block0 and not name.endswith("." + block0):
                continue
            prefix = name[: -len(block0)]
            if all(prefix + t.format(L=0).split("@")[0] in names for t in layout[1:]):
                n_layers = 0
                while prefix + layout[0].format(L=n_layers) in names:
                    n_layers += 1
                return prefix, layout, n_layers
    return None


def _width(model: nn.Module, key: str, batch: Any) -> int:
    from meanablate.hooks import capture, run_model

    with torch.inference_mode(), capture(model, [key]) as store:
        run_model(model, batch)
    return int(store[key].shape[-1])


def hf_units(
    model: nn.Module, granularity: str, layers: Sequence[int] | None, batch: Any
) -> list[str] | None:
    """Units of a GPT-2 / BERT / Llama-style HF model (``None``: not such a model)."""
    from meanablate.adapters.huggingface import n_heads_of

    found = _hf_layout(model)
    if found is None:
        return None
    prefix, (block, heads, mlp, neurons, attn), n_layers = found
    chosen = list(range(n_layers)) if layers is None else list(layers)
    for layer in chosen:
        if not 0 <= layer < n_layers:
            raise InputError(f"layer {layer} out of range for a model with {n_layers} layers")
    out: list[str] = []
    n_heads = n_heads_of(model) if granularity in ("heads", "components") else 0
    n_pos = int(batch["input_ids"].shape[1]) if granularity == "positions" else 0
    for layer in chosen:
        fmt = {"L": layer}
        if granularity in ("heads", "components"):
            out += [
                f"{prefix}{heads.format(**fmt)}[heads={h};n_heads={n_heads}]"
                for h in range(n_heads)
            ]
        if granularity in ("mlps", "components"):
            out.append(prefix + mlp.format(**fmt))
        if granularity == "layers":
            out += [prefix + attn.format(**fmt), prefix + mlp.format(**fmt)]
        if granularity == "neurons":
            key = prefix + neurons.format(**fmt)
            out += [f"{key}[neurons={i}]" for i in range(_width(model, key, batch))]
        if granularity == "positions":
            out += [f"{prefix}{block.format(**fmt)}@input[pos={p}]" for p in range(n_pos)]
    return out
