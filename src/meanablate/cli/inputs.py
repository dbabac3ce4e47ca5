"""Inputs of the command line: a built-in organism, a Hugging Face model, or your function.

Three kinds of input (see :func:`load_inputs`):

- a built-in organism (``organism = "tracr-sort"``): model, data, metric, units, ground truth;
- a local Hugging Face model directory (``model = "path/to/dir"``, loaded offline) with a
  prompts file: plain text, one prompt a line, or JSONL with ``text`` and optional
  ``target`` / ``wrong`` answers (strings of one token each, or token ids) that the metric
  reads at the prompt's last token;
- a Python function (``model = "module:function"`` or ``"path/to/file.py:function"``)
  returning ``(model, batches)`` or ``(model, batches, units)`` (or a dict with those keys
  and optionally ``metric``, ``ground_truth``, ``per_position``); it may take any of
  ``n_examples``, ``batch_size``, ``seed`` as keyword arguments.

Units are site strings, granularities (``heads``, ``neurons:1``: see :func:`resolve_units`)
or ``@FILE``. Bad input raises :class:`~meanablate.config.InputError` with one line that
names the culprit (the flag, or the file and line).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from meanablate.config import (
    BIG_MODEL,
    DEFAULT_N_EXAMPLES,
    DEFAULT_N_EXAMPLES_BIG,
    InputError,
    Resolved,
    subject,
)

__all__ = [
    "GRANULARITIES",
    "Inputs",
    "hf_units",
    "load_inputs",
    "one_line",
    "preflight",
    "read_prompts",
    "resolve_units",
]

Log = Callable[[str], None]  # a logger: one message, to stderr
GRANULARITIES = ("heads", "mlps", "components", "neurons", "layers", "positions")
_GRAN_RE = re.compile(rf"^({'|'.join(GRANULARITIES)})(?::(\d+(?:,\d+)*))?$")


def quiet_log(_msg: str) -> None:
    """A logger that says nothing."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


@dataclass
class Inputs:
    """A model with its data and candidate units, ready for discovery."""

    name: str
    model: nn.Module
    batches: list[Any]
    units: list[str]
    metric: str
    ground_truth: list[str] | None
    per_position: bool
    source: str  # "organism", "huggingface" or "custom"
    description: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        from meanablate.hooks import batch_size_of

        return sum(batch_size_of(b) for b in self.batches)


# -- loading -------------------------------------------------------------------------------
def preflight(cfg: Resolved) -> None:
    """Check that every file the options name exists, before loading anything."""
    for key in ("prompts", "means"):
        if cfg[key] and not Path(cfg[key]).is_file():
            raise InputError(f"{subject(key, cfg.sources[key])} {cfg[key]}: no such file")
    for spec in cfg["units"] or ():
        if spec.strip().startswith("@") and not Path(spec.strip()[1:]).is_file():
            raise InputError(f"{subject('units', cfg.sources['units'])} {spec}: no such file")


def load_inputs(cfg: Resolved, log: Log = quiet_log) -> Inputs:
    """The model, batches, units, metric and ground truth the options ask for."""
    preflight(cfg)
    organism, model_spec = cfg["organism"], cfg["model"]
    if organism and model_spec:
        where = [
            f"{k} from {cfg.sources[k]}"
            for k in ("organism", "model")
            if not cfg.sources[k].startswith("--")
        ]
        raise InputError(
            "give either --organism or --model, not both"
            + (f" ({'; '.join(where)})" if where else "")
        )
    if not organism and not model_spec:
        raise InputError(
            "no model given: pass --organism NAME (see `meanablate organisms`), "
            "--model DIR (a Hugging Face model) or --model module:function"
        )
    device = _device(cfg["device"])
    if (
        model_spec
        and not os.path.isdir(model_spec)
        and (":" not in model_spec or os.path.exists(model_spec))
    ):
        what = "is a file, not a directory" if os.path.exists(model_spec) else "no such directory"
        raise InputError(
            f"{subject('model', cfg.sources['model'])} {model_spec}: {what} (expected a "
            "Hugging Face model directory or module:function)"
        )
    if cfg["prompts"] and not (model_spec and os.path.isdir(model_spec)):
        raise InputError("--prompts goes with --model DIR (a Hugging Face model directory)")
    if organism:
        inputs = _load_organism(cfg, organism)
    elif os.path.isdir(model_spec):
        inputs = _load_hf(cfg, model_spec, log)
    else:
        inputs = _load_custom(cfg, model_spec)
    if cfg["units"]:
        inputs.units = resolve_units(
            inputs.model, cfg["units"], inputs.batches[0], where=cfg.sources["units"]
        )
    if cfg["ground_truth"]:
        inputs.ground_truth = [
            _site_str(u, cfg.sources["ground_truth"]) for u in cfg["ground_truth"]
        ]
    if cfg["metric"]:
        inputs.metric = cfg["metric"]
    _check_metric_fields(inputs.metric, inputs.batches[0], cfg.sources["metric"])
    if cfg["per_position"] is not None:
        inputs.per_position = cfg["per_position"]
    inputs.model.to(device)
    _set_threads(cfg["threads"], inputs.model, device)
    return inputs


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {spec!r}: not a device (use cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {spec}: CUDA is not available here")
    return device


def _set_threads(threads: int, model: nn.Module, device: torch.device) -> None:
    """``--threads N``, or (0) a guess: as many as the CPU has free, 1 for small models."""
    if threads:
        torch.set_num_threads(threads)
        return
    if device.type != "cpu":
        return
    if sum(p.numel() for p in model.parameters()) < BIG_MODEL:
        # Each op of a small model is too short to split across threads; the threads
        # mostly wait on each other (measured: 10-50x slower on a busy 2-core machine).
        torch.set_num_threads(1)
        return
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return
    # Threads on cores other processes use wait on each other: minilm on a 2-core machine
    # with a load of 3.5 took 1.8 s a batch on 2 threads and 0.3 s on 1.
    free = int((os.cpu_count() or 1) - busy + 0.5)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), free)))


def _n_examples(cfg: Resolved) -> int:
    return cfg["n_examples"] if cfg["n_examples"] is not None else DEFAULT_N_EXAMPLES


def _load_organism(cfg: Resolved, name: str) -> Inputs:
    from meanablate import organisms

    known = organisms.names()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(
            f"{cfg.sources['organism']}: unknown organism {name!r}{hint}; known: {', '.join(known)}"
        )
    try:
        org = organisms.load(name)
    except Exception as exc:
        raise InputError(
            f"cannot load organism {name!r}: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    n = cfg["n_examples"]
    if n is None:
        big = sum(p.numel() for p in org.model.parameters()) > BIG_MODEL
        n = DEFAULT_N_EXAMPLES_BIG if big else DEFAULT_N_EXAMPLES
    batches = org.make_batches(n, cfg["batch_size"], cfg["seed"])
    return Inputs(
        name=name,
        model=org.model,
        batches=list(batches),
        units=list(org.units),
        metric=org.metric,
        ground_truth=list(org.ground_truth) if org.ground_truth else None,
        per_position=bool(org.per_position_means),
        source="organism",
        description=org.description,
    )


def _load_custom(cfg: Resolved, spec: str) -> Inputs:
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name.isidentifier():
        raise InputError(f"--model {spec}: expected module:function, e.g. mymodels:build")
    try:
        if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise InputError(f"--model {spec}: no such file {module_name}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove(os.getcwd())
    except InputError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise InputError(f"--model {spec}: no module named {module_name!r}") from None
        raise InputError(f"--model {spec}: importing {module_name}: {one_line(exc)}") from exc
    except Exception as exc:  # the module's own error: --debug shows its traceback
        raise InputError(
            f"--model {spec}: importing {module_name} failed: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise InputError(f"--model {spec}: module {module_name} has no function {func_name!r}")
    wanted = {"n_examples": _n_examples(cfg), "batch_size": cfg["batch_size"], "seed": cfg["seed"]}
    params = inspect.signature(func).parameters
    kwargs = {k: v for k, v in wanted.items() if k in params}
    try:
        out = func(**kwargs)
    except Exception as exc:
        raise InputError(f"--model {spec}: {type(exc).__name__}: {one_line(exc)}") from exc
    fields: dict[str, Any]
    if isinstance(out, Mapping):
        fields = dict(out)
    elif isinstance(out, (tuple, list)) and len(out) in (2, 3):
        fields = dict(zip(("model", "batches", "units"), out))
    else:
        raise InputError(
            f"--model {spec}: must return (model, batches) or (model, batches, units), "
            f"got {type(out).__name__}"
        )
    model = fields.get("model")
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {spec}: the model must be a torch nn.Module, got {model!r:.60}")
    model.eval()
    batches = fields.get("batches")
    if isinstance(batches, (Tensor, Mapping)):
        batches = [batches]
    try:
        batches = list(batches)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(f"--model {spec}: batches must be a list of batches") from None
    if not batches:
        raise InputError(f"--model {spec}: returned no batches")
    units = fields.get("units")
    if units is not None:
        units = resolve_units(model, [str(u) for u in units], batches[0], where=f"--model {spec}")
    elif not cfg["units"]:
        try:
            from meanablate.discovery import transformer_units

            units = transformer_units(model)
        except TypeError:
            raise InputError(
                f"--model {spec}: no units; return them as the third value or pass --units"
            ) from None
    gt = fields.get("ground_truth")
    stem = Path(module_name).stem if module_name.endswith(".py") else module_name
    return Inputs(
        name=f"{stem}.{func_name}",
        model=model,
        batches=batches,
        units=list(units or []),
        metric=str(fields.get("metric") or _default_metric(batches[0])),
        ground_truth=[str(u) for u in gt] if gt else None,
        per_position=bool(fields.get("per_position", False)),
        source="custom",
        description=(inspect.getdoc(func) or "").split("\n\n")[0],
    )


# The batch fields each task metric reads (comparing metrics, kl and l2, need none).
_METRIC_FIELDS = {
    "logit_diff": ("target", "wrong"),
    "loss": ("target",),
    "prob": ("target",),
    "accuracy": ("target",),
    "mse": ("target_value",),
}


def _check_metric_fields(metric: str, batch: Any, where: str) -> None:
    have = set(batch) if isinstance(batch, Mapping) else set()
    missing = [f for f in _METRIC_FIELDS.get(metric, ()) if f not in have]
    if missing:
        who = "--metric" if where.startswith("--") else f"metric {metric!r} (from {where})"
        raise InputError(
            f"{who} {metric} needs the data to have {' and '.join(map(repr, missing))} "
            f"(the batches have {sorted(have) or 'no fields'}; prompts files: JSONL with "
            '"target"/"wrong" answers)'
        )


def _default_metric(batch: Any) -> str:
    if not isinstance(batch, Mapping):
        return "kl"
    if "target" in batch:
        return "logit_diff" if "wrong" in batch else "loss"
    return "mse" if "target_value" in batch else "kl"


# -- Hugging Face ----------------------------------------------------------------------------
def _load_hf(cfg: Resolved, path: str, log: Log) -> Inputs:
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
    if cfg["quiet"]:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise InputError(
            f"--model {path}: cannot read config.json ({type(exc).__name__}: {one_line(exc)})"
        ) from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise InputError(
            f"--model {path}: cannot load its tokenizer ({type(exc).__name__}: {one_line(exc)})"
        ) from None
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
    metric = _default_metric(batches[0])
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


def _answer_id(tokenizer: Any, value: Any, name: str, where: str) -> int:
    vocab = len(tokenizer)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < vocab:
            raise InputError(f"{where}: {name} id {value} outside the vocabulary [0, {vocab})")
        return value
    if not isinstance(value, str):
        raise InputError(f"{where}: {name} must be a string or a token id, got {value!r}")
    ids = tokenizer(value, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InputError(
            f"{where}: {name} {value!r} is {len(ids)} tokens {ids}, not one "
            "(answers must be single tokens; GPT-2 style tokenizers want a leading space)"
        )
    return int(ids[0])


def read_prompts(
    path: str,
    tokenizer: Any,
    batch_size: int,
    n_examples: int | None,
    max_length: int | None = None,
) -> list[dict[str, Tensor]]:
    """Padded batches from a prompts file; a bad line raises naming the file and line.

    JSONL lines with ``target`` (and ``wrong``) get ``[batch, pos]`` fields scored at the
    prompt's last token; plain text prompts get none (``kl`` reads every real token).
    """
    from meanablate.data import read_jsonl, read_text

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--prompts {path}: no such file")
    try:
        first = next((line for line in p.open(encoding="utf-8") if line.strip()), None)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    if first is None:
        raise InputError(f"{path}: no prompts (the file is empty)")
    is_jsonl = p.suffix in (".jsonl", ".ndjson", ".json") or first.lstrip().startswith("{")
    fields: tuple[str, ...] = ()
    if is_jsonl:
        try:
            head = json.loads(first)
        except json.JSONDecodeError:
            head = {}
        if isinstance(head, dict) and "target" in head:
            fields = ("target", "wrong") if "wrong" in head else ("target",)
        records: Any = read_jsonl(p, fields=fields)
    else:
        records = read_text(p)
    if n_examples is not None:
        records = itertools.islice(records, n_examples)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows: list[tuple[list[int], dict[str, int]]] = []
    try:
        for record in records:
            ids = list(tokenizer(record.text)["input_ids"])
            if not ids:
                raise InputError(f"{record.where}: the prompt has no tokens")
            if max_length is not None and len(ids) > max_length:
                raise InputError(
                    f"{record.where}: the prompt is {len(ids)} tokens, longer than the "
                    f"model's {max_length}"
                )
            answers = {f: _answer_id(tokenizer, record.fields[f], f, record.where) for f in fields}
            rows.append((ids, answers))
    except InputError:
        raise
    except ValueError as exc:  # from the readers: "path, line N: ..."
        raise InputError(one_line(exc)) from None
    if not rows:
        raise InputError(f"{path}: no prompts")
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        length = max(len(ids) for ids, _ in chunk)
        ids_t = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        batch: dict[str, Tensor] = {"input_ids": ids_t, "attention_mask": mask}
        for f in fields:
            batch[f] = torch.full((len(chunk), length), -100, dtype=torch.long)
        for i, (ids, answers) in enumerate(chunk):
            ids_t[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            for f, a in answers.items():
                batch[f][i, len(ids) - 1] = a
        batches.append(batch)
    return batches


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


def _site_str(text: str, where: str) -> str:
    from meanablate.sites import parse_site

    try:
        return str(parse_site(text))
    except (ValueError, TypeError) as exc:
        raise InputError(f"{where}: {one_line(exc)}") from None


def resolve_units(model: nn.Module, specs: Sequence[str], batch: Any, *, where: str) -> list[str]:
    """Site strings from ``specs`` (sites, granularities like ``heads``/``neurons:1``, @FILE)."""
    from meanablate.discovery import transformer_units
    from meanablate.sites import as_sites, resolve_module

    out: list[str] = []
    for spec in specs:
        spec = spec.strip()
        if spec.startswith("@"):
            path = Path(spec[1:])
            if not path.is_file():
                raise InputError(f"{where}: units file {path}: no such file")
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip() and not line.lstrip().startswith("#"):
                    out.append(_site_str(line.strip(), f"{path}, line {i}"))
            continue
        m = _GRAN_RE.match(spec)
        if not m:
            out.append(_site_str(spec, where))
            continue
        gran, layers = m.group(1), m.group(2)
        chosen = [int(x) for x in layers.split(",")] if layers else None
        if getattr(getattr(model, "cfg", None), "n_heads", None) is not None:
            n_pos = None
            if gran == "positions":
                tokens = (
                    batch.get("tokens", batch.get("input_ids"))
                    if isinstance(batch, Mapping)
                    else batch
                )
                n_pos = int(tokens.shape[1])
            try:
                out += transformer_units(model, gran, layers=chosen, n_positions=n_pos)  # type: ignore[arg-type]
            except (ValueError, IndexError, TypeError) as exc:
                raise InputError(f"{where}: {spec!r}: {one_line(exc)}") from None
            continue
        units = hf_units(model, gran, chosen, batch) if isinstance(batch, Mapping) else None
        if units is None:
            raise InputError(
                f"{where}: granularity {spec!r} needs a model with a TransformerLens-style "
                f"cfg (or a GPT-2, BERT or Llama-style HF model); {type(model).__name__} has "
                "neither, so list its units as site strings"
            )
        out += units
    out = list(dict.fromkeys(out))
    if not out:
        raise InputError(f"{where}: no units")
    for site in as_sites(out):
        try:
            resolve_module(model, site.module)
        except ValueError as exc:
            raise InputError(f"{where}: unit {str(site)!r}: {one_line(exc)}") from None
    return out
