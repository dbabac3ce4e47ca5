"""Bring your own tracr program: :func:`from_tracr` compiles any RASP program into an
:class:`~meanablate.organisms.registry.Organism` whose true circuit is computed.

Steps: compile with tracr (``[tracr]`` extra); copy the weights into our
:class:`~meanablate.organisms.transformer.HookedTransformer`; enumerate every input
(``[BOS, t1, ..., tL]``, ``L = max_seq_len``; or the ``inputs`` you give, or a sample);
take the targets from tracr's own RASP interpreter (``rasp.evaluate``) and check the
compiled model against them on every input; pick the metric (``kl`` — KL divergence of the
ablated output distribution from the clean model's at the scored positions, as ACDC uses
on tracr — for categorical outputs by default, ``accuracy`` and ``loss`` available;
``mse`` for numerical ones); list the units (every head and MLP); and compute the
ground truth by brute force, for that metric: for each mean kind
(:data:`~meanablate.stats.MEAN_KINDS`), every subset of units is kept with the rest
mean-ablated, and the smallest subsets whose faithfulness reaches ``target_faithfulness``
are the minimal circuits. The card records all of it.

:func:`save` / :func:`load` write and read the weights (safetensors) and the card (JSON,
with the data set in it), so loading needs neither tracr nor jax: compiling takes 10-15 s
(jax), loading a few milliseconds.

>>> from tracr.compiler import lib                    # doctest: +SKIP
>>> org = from_tracr(lib.make_hist(), vocab={"a", "b"}, max_seq_len=3)  # doctest: +SKIP
>>> org.card["ground_truth_by_mean_kind"]["plain"]["circuits"]  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from meanablate.organisms.registry import Batch, Organism

__all__ = ["card_json", "exhaustive_batch", "from_tracr", "load", "organism_from_card", "save"]

IGNORE_INDEX = -100
MAX_INPUTS = 20_000
MAX_BRUTE_UNITS = 14
DEFAULT_MEAN_KIND = "per_position"
CATEGORICAL_METRICS = ("kl", "accuracy", "loss")
NUMERICAL_METRICS = ("mse",)
TracrMetric = Literal["kl", "accuracy", "loss", "mse"]


def from_tracr(
    program: Any,
    *,
    vocab: Iterable[Any],
    max_seq_len: int,
    compiler_bos: str = "BOS",
    compiler_pad: str = "compiler_pad",
    causal: bool = False,
    mlp_exactness: int = 100,
    name: str | None = None,
    description: str = "",
    inputs: Iterable[Sequence[Any]] | None = None,
    sample: int | None = None,
    seed: int = 0,
    max_inputs: int = MAX_INPUTS,
    target_faithfulness: float = 0.95,
    max_brute_units: int = MAX_BRUTE_UNITS,
    accuracy_tolerance: float = 0.01,
    metric: TracrMetric | None = None,
) -> Organism:
    """Compile the RASP ``program`` and return its organism (model, data, metric, units,
    card, computed ground truth).

    ``vocab``: the input values; ``max_seq_len``: the input length (every input has
    exactly this many tokens after BOS). ``inputs``: the input sequences to use instead of
    all ``len(vocab) ** max_seq_len`` (e.g. only those the program is defined on); over
    ``max_inputs`` of them is refused unless ``sample=N`` picks N at random (``seed``).
    ``target_faithfulness``: what a minimal circuit must reach. Brute force needs at most
    ``max_brute_units`` units (``2 ** units`` subsets); beyond, the card says it was not
    computed.

    ``metric`` (the organism's metric; the ground truth is computed for it): categorical
    outputs default to ``"kl"``, KL(clean || ablated) of the output distribution, mean over
    the scored positions. KL rather than accuracy because accuracy is a step function:
    every subset that keeps the argmax scores the same, so "minimal" is decided by ties,
    and the faithfulness threshold cannot tell a circuit that barely keeps the answer from
    one that reproduces the model; KL is continuous, 0 exactly for the full model, and
    needs no target (ACDC's choice on tracr). ``"accuracy"`` and ``"loss"``
    (cross-entropy of the target; the shipped ``tracr-*`` organisms use it) remain
    available. Numerical outputs use ``"mse"`` (the card also defines an accuracy within
    ``accuracy_tolerance``, for reading, not as the organism's metric).

    Raises ``ValueError`` (before writing anything) for an argument out of range, if tracr
    cannot compile the program, the inputs are too many to enumerate (pass ``sample=N``),
    or the compiled model disagrees with tracr.
    """
    vocab_values = sorted(set(vocab), key=lambda v: (str(type(v)), v))
    if not vocab_values:
        raise ValueError("vocab must hold at least one input value")
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be an int >= 1, got {max_seq_len!r}")
    _check_ranges(target_faithfulness, max_brute_units, max_inputs, accuracy_tolerance, metric)
    seqs = _inputs(vocab_values, max_seq_len, inputs, sample, seed, max_inputs)
    compiled = _compile(
        program, vocab_values, max_seq_len, causal, compiler_bos, compiler_pad, mlp_exactness
    )
    from meanablate.organisms import tracr_convert

    model = tracr_convert.to_hooked_transformer(compiled)
    card = _card_head(compiled, model, vocab_values, max_seq_len, name, description)
    card["source"].update(
        causal=causal,
        compiler_bos=compiler_bos,
        compiler_pad=compiler_pad,
        mlp_exactness=mlp_exactness,
    )
    _add_examples(card, compiled, seqs, accuracy_tolerance, metric)
    card["dataset"]["sampled"] = sample is not None
    card["dataset"]["exhaustive"] = inputs is None and sample is None
    _check_against_tracr(card, model)
    card["program_components"] = [c["unit"] for c in tracr_convert.program_components(compiled)]
    card["components"] = tracr_convert.program_components(compiled)
    org = organism_from_card(card, model)
    from meanablate.organisms.ground_truth import add_ground_truth

    add_ground_truth(org, target_faithfulness, max_brute_units)
    gt = org.card["ground_truth"]
    org.ground_truth = list(gt) if gt is not None else None
    return org


def _check_ranges(
    target: float, max_units: int, max_inputs: int, tol: float, metric: str | None
) -> None:
    if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target <= 1:
        raise ValueError(
            f"target_faithfulness must be a number in (0, 1] (the fraction of the full "
            f"model's behaviour a minimal circuit keeps), got {target!r}"
        )
    for arg, value in (("max_brute_units", max_units), ("max_inputs", max_inputs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol > 0:
        raise ValueError(f"accuracy_tolerance must be a number > 0, got {tol!r}")
    known = sorted({*CATEGORICAL_METRICS, *NUMERICAL_METRICS})
    if metric is not None and metric not in known:
        raise ValueError(f"metric must be one of {known} or None (default), got {metric!r}")


# -- inputs ------------------------------------------------------------------------------
def _inputs(
    vocab: list[Any],
    length: int,
    inputs: Iterable[Sequence[Any]] | None,
    sample: int | None,
    seed: int,
    max_inputs: int,
) -> list[tuple[Any, ...]]:
    if inputs is not None:
        seqs = [tuple(s) for s in inputs]
        bad = [s for s in seqs if len(s) != length or not set(s) <= set(vocab)]
        if bad:
            raise ValueError(
                f"inputs must be sequences of {length} values from vocab {vocab}; got {bad[0]}"
            )
        if not seqs:
            raise ValueError("inputs is empty")
    else:
        total = len(vocab) ** length
        if sample is None and total > max_inputs:
            raise ValueError(
                f"vocab of {len(vocab)} values and max_seq_len {length} give "
                f"{len(vocab)}**{length} = {total} inputs, more than max_inputs={max_inputs} "
                "can enumerate; pass sample=N (CLI: --sample N) to use N random inputs instead "
                "(the card says so), inputs=[...] to choose them, or a larger max_inputs"
            )
        if sample is None:
            return list(itertools.product(vocab, repeat=length))
        seqs = []
    if sample is not None:
        if not isinstance(sample, int) or sample < 1:
            raise ValueError(f"sample must be an int >= 1, got {sample!r}")
        rng = random.Random(seed)
        if seqs:
            return [seqs[rng.randrange(len(seqs))] for _ in range(sample)]
        return [tuple(rng.choice(vocab) for _ in range(length)) for _ in range(sample)]
    return seqs


def _compile(program: Any, vocab: list[Any], length: int, *args: Any) -> Any:
    from meanablate.organisms.tracr_convert import compile_program

    try:
        return compile_program(program, set(vocab), length, **dict(zip(_KW, args, strict=True)))
    except (TypeError, ValueError) as exc:
        if "tracr cannot compile" in str(exc) or "must be a tracr" in str(exc):
            raise
        raise ValueError(f"tracr cannot compile this program: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # tracr raises bare Exceptions and NotImplementedErrors
        raise ValueError(f"tracr cannot compile this program: {type(exc).__name__}: {exc}") from exc


_KW = ("causal", "compiler_bos", "compiler_pad", "mlp_exactness")


# -- the card and its data ---------------------------------------------------------------
def _card_head(
    compiled: Any, model: Any, vocab: list[Any], length: int, name: str | None, description: str
) -> dict[str, Any]:
    am = compiled.assembled
    enc = am.input_encoder
    by_id = sorted(enc.encoding_map.items(), key=lambda kv: kv[1])
    tokens = [str(v) for v, _ in by_id]
    label = compiled.program.name
    units = []
    for layer in range(model.cfg.n_layers):
        units += [f"blocks.{layer}.attn.hook_z[heads={h}]" for h in range(model.cfg.n_heads)]
        units.append(f"blocks.{layer}.hook_mlp_out")
    return {
        "name": name or f"tracr-{label}",
        "task": label,
        "description": description or f"tracr-compiled RASP program {label}.",
        "source": {
            "compiler": "tracr, meanablate.organisms.from_tracr",
            "rasp": label,
            "vocab": vocab,
            "max_seq_len": length,
        },
        "vocabulary": {
            "tokens": tokens,
            "ids": {t: i for i, t in enumerate(tokens)},
            "size": len(tokens),
            "bos": str(enc.bos_token),
            "bos_id": enc.bos_encoding,
            "pad": str(enc.pad_token),
            "pad_id": enc.pad_encoding,
            "input_values": [str(v) for v in vocab],
        },
        "n_input_tokens": length,
        "input_length": length + 1,
        "input_format": f"[BOS, t1, ..., t{length}]: BOS (id {enc.bos_encoding}) at position "
        f"0, then exactly {length} tokens from input_values; fixed length, no padding. "
        "Token ids are tracr's input-encoder ids.",
        "units": units,
    }


def _add_examples(
    card: dict[str, Any], compiled: Any, seqs: list[tuple], tol: float, metric: str | None
) -> None:
    from tracr.rasp import rasp

    am = compiled.assembled
    enc = am.input_encoder
    rows, outs = [], []
    for s in seqs:
        out = rasp.evaluate(compiled.program, list(s))
        if any(v is None for v in out):
            raise ValueError(
                f"the program's output is undefined (None) on input {list(s)}: {out}; pass "
                "inputs=[...] with only the inputs it is defined on"
            )
        rows.append(enc.encode([enc.bos_token, *s]))
        outs.append(out)
    scored = list(range(1, card["input_length"]))
    card["dataset"] = {
        "description": "Inputs: every sequence of max_seq_len input values (or those "
        "given/sampled, see 'exhaustive'/'sampled'); targets are tracr's own RASP "
        "evaluation of the program (rasp.evaluate), not the model's output. "
        "make_batches(n, batch_size, seed) draws n of them uniformly with replacement.",
        "size": len(rows),
        "exhaustive_size": len(rows),
        "scored_positions": scored,
    }
    if compiled.categorical:
        values = compiled.output_values
        cls = {v: i for i, v in enumerate(values)}
        target = [[IGNORE_INDEX] + [cls[v] for v in out] for out in outs]
        card["output"] = {
            "type": "categorical",
            "classes": [str(v) for v in values],
            "residual_labels": compiled.output_labels,
            "batch_key": "target",
            "note": "logits[..., c] is the residual stream's one-hot value for class c "
            "(W_U one-hot): about 1 for the right class and 0 for the others. The output "
            "classes need not be the input values.",
        }
        card["metric"] = _pick(metric, CATEGORICAL_METRICS, "categorical")
        card["metrics"] = {
            "kl": "KL(clean || ablated): KL divergence of the ablated model's softmax "
            "output distribution from the clean (unablated) model's, mean over scored "
            "positions (0 for the full model)",
            "loss": "mean cross-entropy of logits against target over scored positions",
            "accuracy": "argmax(logits) == target over scored positions",
        }
        card["examples"] = {"tokens": rows, "target": target}
    else:
        card["output"] = {
            "type": "numerical",
            "classes": None,
            "residual_labels": compiled.output_labels,
            "batch_key": "target_value",
            "note": "logits[..., 0] is the prediction (d_vocab_out = 1).",
        }
        card["metric"] = _pick(metric, NUMERICAL_METRICS, "numerical")
        card["accuracy_tolerance"] = tol
        card["metrics"] = {
            "mse": "mean squared error of logits[..., 0] against target_value",
            "accuracy": "|logits[..., 0] - target_value| < accuracy_tolerance",
        }
        card["examples"] = {
            "tokens": rows,
            "target_value": [[None] + [float(v) for v in out] for out in outs],
        }


def _pick(metric: str | None, allowed: tuple[str, ...], kind: str) -> str:
    if metric is None:
        return allowed[0]
    if metric not in allowed:
        raise ValueError(
            f"metric {metric!r} does not fit this program's {kind} output; use one of "
            f"{list(allowed)}"
        )
    return metric


def exhaustive_batch(card: Mapping[str, Any]) -> Batch:
    """Every example of the card's data set as one batch (``tokens [n, pos]`` + targets)."""
    ex = card["examples"]
    batch = {"tokens": torch.tensor(ex["tokens"], dtype=torch.long)}
    if "target" in ex:
        batch["target"] = torch.tensor(ex["target"], dtype=torch.long)
    else:
        values = [[float("nan") if v is None else v for v in row] for row in ex["target_value"]]
        batch["target_value"] = torch.tensor(values, dtype=torch.float32)
    return batch


def make_batches(
    card: Mapping[str, Any], n_examples: int, batch_size: int, seed: int = 0
) -> list[Batch]:
    """``n_examples`` examples of the data set, uniformly with replacement (``seed``).

    On an exhaustive data set (every sequence, in ``itertools.product`` order) each
    position's value is drawn on its own, ``torch.randint(len(vocab), (n, max_seq_len))``,
    and the example with those values is taken: the same draws, token for token, as a
    sampler of uniform random sequences (the one ``tracr-reverse``, ``tracr-frac_prevs``
    and ``tracr-sort`` had before they were built by :func:`from_tracr`). Otherwise
    (``inputs=`` or ``sample=``) examples are drawn by index.
    """
    if n_examples < 1 or batch_size < 1:
        raise ValueError("n_examples and batch_size must be >= 1")
    full = exhaustive_batch(card)
    gen = torch.Generator().manual_seed(int(seed))
    if card["dataset"].get("exhaustive"):
        n_values, length = len(card["vocabulary"]["input_values"]), card["n_input_tokens"]
        picks = torch.randint(n_values, (n_examples, length), generator=gen)
        place = n_values ** torch.arange(length - 1, -1, -1)
        idx = (picks * place).sum(1)
    else:
        idx = torch.randint(len(full["tokens"]), (n_examples,), generator=gen)
    picked = {k: v[idx] for k, v in full.items()}
    return [
        {k: v[i : i + batch_size] for k, v in picked.items()}
        for i in range(0, n_examples, batch_size)
    ]


def _check_against_tracr(card: dict[str, Any], model: Any) -> None:
    batch = exhaustive_batch(card)
    with torch.no_grad():
        logits = model(batch["tokens"])[:, 1:]
    if "target" in batch:
        ok = (logits.argmax(-1) == batch["target"][:, 1:]).all(1)
    else:
        err = (logits[..., 0].double() - batch["target_value"][:, 1:].double()).abs()
        ok = (err < 1e-3).all(1)
    n_bad = int((~ok).sum())
    if n_bad:
        first = int((~ok).nonzero()[0])
        raise ValueError(
            f"the compiled model disagrees with tracr's RASP evaluation on {n_bad} of "
            f"{len(ok)} inputs (first: tokens {batch['tokens'][first].tolist()}); tracr's "
            "MLPs approximate numerical maps: try a larger mlp_exactness, or pass inputs="
        )
    card["tracr_check"] = {
        "agree": len(ok),
        "inputs": len(ok),
        "how": "argmax of our model's logits (numerical: within 1e-3) equals "
        "rasp.evaluate(program, input) at every scored position",
    }


def organism_from_card(card: dict[str, Any], model: Any) -> Organism:
    """The :class:`Organism` of a from_tracr card and its model."""
    gt = card.get("ground_truth")
    return Organism(
        name=card["name"],
        model=model.eval(),
        make_batches=partial(make_batches, card),
        metric=card["metric"],
        units=list(card["units"]),
        ground_truth=list(gt) if gt is not None else None,
        card=card,
        description=card["description"],
        per_position_means=card.get("mean_kind", DEFAULT_MEAN_KIND) == "per_position",
    )


# -- files ---------------------------------------------------------------------------------
def save(org: Organism, directory: str | Path, stem: str | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` (default stem: the name with
    ``-`` as ``_``); returns both paths."""
    from meanablate.organisms.transformer import save_model

    directory = Path(directory)
    stem = stem or org.name.replace("-", "_")
    weights, card_path = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    directory.mkdir(parents=True, exist_ok=True)
    save_model(org.model, weights, extra={"card": card_path.name})
    card_path.write_text(card_json(org.card))
    return weights, card_path


def card_json(card: Mapping[str, Any]) -> str:
    """The card as :func:`save` writes it: JSON, indent 1, final newline; the data set
    (``examples``) one input per line (an indented number per line would triple the file).
    """
    if "examples" not in card:
        return json.dumps(card, indent=1) + "\n"
    mark = '"examples": "<rows>"'
    head = json.dumps({**card, "examples": "<rows>"}, indent=1)
    if head.count(mark) != 1:  # pragma: no cover - a text field holding the marker
        return json.dumps(card, indent=1) + "\n"
    fields = []
    for key, rows in card["examples"].items():
        lines = ",\n".join("   " + json.dumps(row, separators=(",", ":")) for row in rows)
        fields.append(f"  {json.dumps(key)}: [\n{lines}\n  ]")
    examples = '"examples": {\n' + ",\n".join(fields) + "\n }"
    return head.replace(mark, examples) + "\n"


def load(path: str | Path) -> Organism:
    """Read an organism written by :func:`save` (``path``: either file, or the stem)."""
    from meanablate.organisms.transformer import load_model

    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    card = json.loads(stem.with_suffix(".json").read_text())
    model = load_model(stem.with_suffix(".safetensors"))
    return organism_from_card(card, model)


def load_shipped(stem: str) -> Organism:
    """A from_tracr organism shipped in ``meanablate/organisms/data``."""
    from importlib import resources

    from meanablate.organisms import registry

    with resources.as_file(registry.data_path(f"{stem}.safetensors")) as path:
        return load(path)


def load_hist() -> Organism:
    """tracr ``lib.make_hist()``: how often each token occurs in the input."""
    return load_shipped("tracr_hist")


def load_sort_unique() -> Organism:
    """tracr ``lib.make_sort_unique(tokens, tokens)``: sort inputs of distinct tokens."""
    return load_shipped("tracr_sort_unique")
