"""Hugging Face models (``--model DIR``, loaded offline) and their units: heads, MLPs,
neurons, layers and positions of GPT-2, GPT-NeoX, BERT and Llama-style models
(:func:`hf_units`). Encoders load as masked LMs and are scored at their mask tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from meanablate.cli.errors import one_line
from meanablate.cli.prompts import read_prompts
from meanablate.cli.records import Inputs, Log, default_metric
from meanablate.config import InputError, Resolved

__all__ = ["hf_units", "is_masked_lm", "load_hf"]


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
    masked = is_masked_lm(config)
    batches = read_prompts(
        cfg["prompts"],
        tokenizer,
        cfg["batch_size"],
        cfg["n_examples"],
        max_len,
        mask_token_id=tokenizer.mask_token_id if masked else None,
    )
    model = None
    errors = []
    # An encoder (BERT-style) predicts masked tokens: its causal-LM class would put a
    # left-to-right head on it.
    autos = (transformers.AutoModelForMaskedLM,) if masked else (transformers.AutoModelForCausalLM,)
    for auto in (*autos, transformers.AutoModel):
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


def is_masked_lm(config: Any) -> bool:
    """Whether ``config`` describes a masked LM (an encoder such as BERT), not a causal one.

    Its saved ``architectures`` decide (``BertForMaskedLM``); without them, an encoder
    config (``is_decoder`` false) of a model type that has a masked-LM class.
    """
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return True
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
        config, "is_decoder", False
    )


def hf_units(
    model: nn.Module, granularity: str, layers: Sequence[int] | None, batch: Any
) -> list[str] | None:
    """Units of a GPT-2 / GPT-NeoX / BERT / Llama-style HF model, named by its family
    (:func:`meanablate.transformer_units`); ``None``: not such a model."""
    from meanablate.discovery import transformer_units
    from meanablate.families import family_of
    from meanablate.families.hf import HFFamily

    if not isinstance(family_of(model), HFFamily):
        return None
    n_pos = int(batch["input_ids"].shape[1]) if granularity == "positions" else None
    try:
        return transformer_units(
            model,
            granularity,  # type: ignore[arg-type]
            layers=None if layers is None else list(layers),
            n_positions=n_pos,
        )
    except (IndexError, ValueError) as exc:
        raise InputError(one_line(exc)) from None
