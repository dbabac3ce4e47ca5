#!/usr/bin/env python
"""Compile the tracr organisms into ``src/meanablate/organisms/data/tracr_<task>.*``.

    python scripts/compile_tracr.py            # (re)write the weights and cards
    python scripts/compile_tracr.py --check    # compile, compare with the shipped files

``hist`` and ``sort_unique`` (:data:`PROGRAMS`) are built entirely by the public API,
:func:`meanablate.organisms.from_tracr` (this script only names the programs and writes
the files). ``reverse``, ``frac_prevs`` and ``sort`` are compiled and converted by the same
library code (:mod:`meanablate.organisms.tracr_convert`) and keep their hand-written card
text (task-specific targets, notes, a single-unit ablation study), made by the code below;
their ground truth is computed by the same public brute force as ``from_tracr``'s
(:func:`meanablate.organisms.ground_truth.add_ground_truth`: every unit subset, every mean
kind, faithfulness >= :data:`TARGET_FAITHFULNESS`), not declared.

For each task this compiles a RASP program with tracr (the ``[tracr]`` extra,
``tracr-pypi``), copies the weights into our
:class:`~meanablate.organisms.transformer.HookedTransformer`, checks that the copy agrees
with tracr on every input of the task, computes the minimal circuits per mean kind, and
writes ``tracr_<task>.safetensors`` plus the card ``tracr_<task>.json``.

The output is deterministic. (tracr-pypi suffixes labels with a global expression
counter, e.g. ``length_5``; the tasks are always compiled together, in the order of
:data:`TASKS`, so the residual labels in the cards are stable too.)

Conversion (tracr -> ours): tracr's ``layer_k/attn`` then ``layer_k/mlp`` make our block
``k``; query/key/value ``[d_model, head * key_size]`` become ``W_Q/W_K/W_V [head, d_model,
d_head]`` with ``d_head = key_size`` (tracr zero-pads value sizes and missing heads to
this itself; we keep the padding); ``linear`` becomes ``W_O [head, d_head, d_model]``;
``mlp/linear_1``/``linear_2`` become ``W_in``/``W_out``; all biases are copied (tracr's
are zero). ``W_E`` is tracr's token embedding (rows = tracr's input-encoder ids, which
also write the ``one`` direction), ``W_pos`` tracr's position embedding (row 0, BOS, is
zero), and ``W_U`` is the one-hot projection of the residual stream onto the output space
(one column per output class, or the single numerical output dimension).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meanablate.organisms import tracr_convert, tracr_models
from meanablate.organisms.transformer import (
    HookedTransformer,
    TransformerConfig,
    load_model,
    save_model,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "meanablate" / "organisms" / "data"

BOS = "BOS"
PAD = "compiler_pad"
MLP_EXACTNESS = 100
# A unit "matters" when ablating it alone raises the task metric by more than this.
MATTERS_ATOL = 1e-4
# What a minimal circuit must reach (faithfulness), as for from_tracr's organisms.
TARGET_FAITHFULNESS = 0.95

TASKS: dict[str, dict[str, Any]] = {
    "reverse": {
        "rasp": "lib.make_reverse(rasp.tokens)",
        "vocab": ["a", "b", "c"],
        "max_seq_len": 5,
        "causal": False,
        "description": "Reverse the input: output position i (1..5) holds input token 6 - i.",
    },
    "frac_prevs": {
        "rasp": 'lib.make_frac_prevs(rasp.tokens == "x")',
        "vocab": ["a", "b", "c", "x"],
        "max_seq_len": 5,
        "causal": True,
        "description": "Running fraction of 'x' tokens: output position i (1..5) holds "
        "(number of 'x' among input tokens 1..i) / i.",
    },
    "sort": {
        "rasp": "lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=5, min_key=1)",
        "vocab": [1, 2, 3, 4, 5],
        "max_seq_len": 5,
        "causal": False,
        "description": "Sort the input (ascending, stable; repeats allowed): output "
        "position i (1..5) holds the i-th smallest input token.",
    },
}


def build_program(task: str):
    from tracr.compiler import lib
    from tracr.rasp import rasp

    if task == "reverse":
        return lib.make_reverse(rasp.tokens)
    if task == "frac_prevs":
        return lib.make_frac_prevs(rasp.tokens == "x")
    if task == "sort":
        return lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=5, min_key=1)
    raise ValueError(task)


@dataclass
class Compiled(tracr_convert.Compiled):
    """The library's compiled program, with the task it is for."""

    task: str = ""


def compile_task(task: str) -> Compiled:
    """The library's step-by-step compilation (it keeps the graph for the card)."""
    spec = TASKS[task]
    c = tracr_convert.compile_program(
        build_program(task),
        set(spec["vocab"]),
        spec["max_seq_len"],
        causal=spec["causal"],
        compiler_bos=BOS,
        compiler_pad=PAD,
        mlp_exactness=MLP_EXACTNESS,
    )
    return Compiled(**{f: getattr(c, f) for f in c.__dataclass_fields__}, task=task)


def output_labels(compiled: Compiled) -> list[str]:
    return compiled.output_labels


def is_categorical(compiled: Compiled) -> bool:
    return compiled.categorical


to_hooked_transformer = tracr_convert.to_hooked_transformer


def vocabulary(compiled: Compiled) -> dict[str, Any]:
    enc = compiled.assembled.input_encoder
    by_id = sorted(enc.encoding_map.items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(len(by_id)))
    tokens = [str(v) for v, _ in by_id]
    return {
        "tokens": tokens,
        "ids": {t: i for i, t in enumerate(tokens)},
        "size": len(tokens),
        "bos": BOS,
        "bos_id": enc.bos_encoding,
        "pad": PAD,
        "pad_id": enc.pad_encoding,
        "input_values": [str(v) for v in TASKS[compiled.task]["vocab"]],
    }


# -- running tracr ----------------------------------------------------------------------
def tracr_decode(assembled, seqs: list[list[Any]]) -> list[list[Any]]:
    """``assembled.apply([BOS, *seq]).decoded`` for many sequences, in one jitted batch.

    Same computation as ``apply`` (encode, ``forward``, decode, BOS at position 0).
    """
    import jax
    import jax.numpy as jnp

    enc = assembled.input_encoder
    ids = np.array([enc.encode([BOS, *s]) for s in seqs], dtype=np.int32)
    out = jax.jit(assembled.forward)(assembled.params, jnp.asarray(ids))
    rows = np.asarray(out.unembedded_output).tolist()
    return [[BOS, *assembled.output_encoder.decode(row)[1:]] for row in rows]


def raw_value(token: str, task: str) -> Any:
    """A card token string -> the value tracr's RASP program sees."""
    return int(token) if task == "sort" else token


def compare_with_tracr(
    compiled: Compiled, model: HookedTransformer, card: dict[str, Any]
) -> tuple[int, int]:
    """(agreeing inputs, all inputs) over the exhaustive input set of the task."""
    batch = tracr_models.exhaustive_batches(card, batch_size=10**9)[0]
    tokens = batch["tokens"]
    vocab = card["vocabulary"]["tokens"]
    seqs = [[raw_value(vocab[i], compiled.task) for i in row[1:]] for row in tokens.tolist()]
    theirs = tracr_decode(compiled.assembled, seqs)
    with torch.no_grad():
        logits = model(tokens)
    if card["output"]["type"] == "categorical":
        classes = card["output"]["classes"]
        ours = [[classes[c] for c in row[1:]] for row in logits.argmax(-1).tolist()]
        agree = sum(o == [str(v) for v in t[1:]] for o, t in zip(ours, theirs, strict=True))
    else:
        pred = logits[..., 0].double().numpy()
        ref = np.array([t[1:] for t in theirs], dtype=np.float64)
        agree = int((np.abs(pred[:, 1:] - ref) < 1e-5).all(axis=1).sum())
    return agree, len(seqs)


# -- components and mean ablation -------------------------------------------------------
def _describe(expr) -> str:
    from tracr.rasp import rasp

    def sel(s) -> str:
        return f"Select(keys={s.keys.name}, queries={s.queries.name}, {s.predicate.name})"

    if isinstance(expr, rasp.Aggregate):
        return f"{expr.name} = Aggregate({sel(expr.selector)}, {expr.sop.name})"
    if isinstance(expr, rasp.SelectorWidth):
        return f"{expr.name} = SelectorWidth({sel(expr.selector)})"
    if isinstance(expr, rasp.SequenceMap):
        return f"{expr.name} = SequenceMap({expr.fst.name}, {expr.snd.name})"
    if isinstance(expr, rasp.Map):
        return f"{expr.name} = Map({expr.inner.name})"
    return f"{expr.name} = {type(expr).__name__}"


def program_components(compiled: Compiled) -> list[dict[str, Any]]:
    """Which of our units implement which RASP operation (from tracr's craft graph)."""
    from tracr.compiler import nodes
    from tracr.craft import transformers
    from tracr.rasp import rasp

    located: dict[str, dict[str, Any]] = {}

    def add(unit: str, expr, part: str, extra: dict[str, Any] | None = None) -> None:
        entry = located.setdefault(unit, {"unit": unit, "rasp": []})
        op = {"op": _describe(expr), "part": part, "encoding": _encoding(expr)}
        entry["rasp"].append({**op, **(extra or {})})

    def _encoding(expr) -> str:
        return "numerical" if rasp.is_numerical(expr) else "categorical"

    def find_head(head) -> str:
        for block, name in zip(compiled.craft_model.blocks, compiled.module_names, strict=True):
            if "attn" in name:
                for i, other in enumerate(block.as_multi().heads()):
                    if other is head:
                        return f"blocks.{_layer(name)}.attn.hook_z[heads={i}]"
        raise LookupError("head not found in the craft model")

    def find_mlp(mlp) -> tuple[str, str]:
        hidden = list(mlp.fst.output_space.basis)
        for block, name in zip(compiled.craft_model.blocks, compiled.module_names, strict=True):
            if "mlp" in name:
                basis = list(block.fst.output_space.basis)
                if all(d in basis for d in hidden):
                    return f"blocks.{_layer(name)}.hook_mlp_out", _ranges(
                        basis.index(d) for d in hidden
                    )
        raise LookupError("MLP not found in the craft model")

    for _, node in compiled.graph.nodes.items():
        block = node.get(nodes.MODEL_BLOCK)
        if block is None:
            continue
        expr = node[nodes.EXPR]
        parts = block.blocks if isinstance(block, transformers.SeriesWithResiduals) else [block]
        for part in parts:
            if isinstance(part, transformers.MLP):
                unit, neurons = find_mlp(part)
                role = "MLP" if len(parts) == 1 else "SelectorWidth MLP (BOS share -> count)"
                add(unit, expr, role, {"hidden_neurons": neurons})
            else:
                for head in part.as_multi().heads():
                    role = "attention" if len(parts) == 1 else "SelectorWidth attention"
                    add(find_head(head), expr, role)
    return [located[u] for u in _unit_order(located)]


def _ranges(indices) -> str:
    """Sorted indices as a compact string, e.g. ``"0-11,14"``."""
    out: list[str] = []
    idx = sorted(indices)
    start = prev = idx[0]
    for i in [*idx[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def _layer(module_name: str) -> int:
    return int(module_name.split("/")[1].removeprefix("layer_"))


def _unit_order(units) -> list[str]:
    def key(u: str) -> tuple[int, int, int]:
        layer = int(u.split(".")[1])
        return (layer, 1, 0) if u.endswith("hook_mlp_out") else (layer, 0, _head(u))

    return sorted(units, key=key)


def _head(unit: str) -> int:
    return int(unit.split("heads=")[1].rstrip("]"))


def all_units(cfg: TransformerConfig) -> list[str]:
    units = []
    for layer in range(cfg.n_layers):
        units += [f"blocks.{layer}.attn.hook_z[heads={h}]" for h in range(cfg.n_heads)]
        units.append(f"blocks.{layer}.hook_mlp_out")
    return units


def _hook_point(model: HookedTransformer, unit: str) -> tuple[torch.nn.Module, int | None]:
    name = unit.split("[")[0]
    head = _head(unit) if "[heads=" in unit else None
    return model.get_submodule(name), head


def unit_means(
    model: HookedTransformer, tokens: torch.Tensor, units: list[str], per_position: bool
) -> dict[str, torch.Tensor]:
    """Mean activation of each unit over the data set (per position, or over positions)."""
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for unit in units:
        module, head = _hook_point(model, unit)

        def save(_m, _i, out, unit=unit, head=head):
            acts[unit] = (out[:, :, head] if head is not None else out).detach().double()

        handles.append(module.register_forward_hook(save))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    dims = (0,) if per_position else (0, 1)  # [pos, ...] or [...]; both broadcast
    return {u: a.mean(dim=dims).float() for u, a in acts.items()}


def run_mean_ablated(
    model: HookedTransformer,
    tokens: torch.Tensor,
    means: dict[str, torch.Tensor],
    ablate: list[str],
) -> torch.Tensor:
    """Logits with every unit in ``ablate`` replaced by its mean."""
    handles = []
    for unit in ablate:
        module, head = _hook_point(model, unit)

        def replace(_m, _i, out, mean=means[unit], head=head):
            out = out.clone()
            if head is None:
                out[:] = mean
            else:
                out[:, :, head] = mean
            return out

        handles.append(module.register_forward_hook(replace))
    try:
        with torch.no_grad():
            return model(tokens)
    finally:
        for h in handles:
            h.remove()


def ablation_study(
    model: HookedTransformer, card: dict[str, Any], per_position: bool
) -> dict[str, Any]:
    """Clean score, each unit ablated alone, and the ground truth (units that matter)."""
    batch = tracr_models.exhaustive_batches(card, batch_size=10**9)[0]
    tokens = batch["tokens"]
    units = all_units(model.cfg)
    means = unit_means(model, tokens, units, per_position)
    metric = card["metric"]

    def run(ablate: list[str]) -> dict[str, float]:
        s = tracr_models.score(card, run_mean_ablated(model, tokens, means, ablate), batch)
        return {k: round(v, 6) for k, v in s.items()}

    clean = run([])
    single = {u: run([u]) for u in units}
    truth = [u for u in units if single[u][metric] > clean[metric] + MATTERS_ATOL]
    complement = run([u for u in units if u not in truth])
    return {
        "clean": clean,
        "ablate_one": single,
        "ground_truth": truth,
        "ablate_all_but_ground_truth": complement,
    }


# -- cards --------------------------------------------------------------------------
def make_card(compiled: Compiled, model: HookedTransformer) -> dict[str, Any]:
    task = compiled.task
    spec = TASKS[task]
    categorical = is_categorical(compiled)
    vocab = vocabulary(compiled)
    n_in = spec["max_seq_len"]
    card: dict[str, Any] = {
        "name": f"tracr-{task}",
        "task": task,
        "description": f"tracr-compiled RASP program {spec['rasp']}. {spec['description']}",
        "source": {
            "compiler": "tracr (tracr-pypi 1.0.0), compiling.compile_rasp_to_model",
            "rasp": spec["rasp"],
            "vocab": vocab["input_values"],
            "max_seq_len": n_in,
            "causal": spec["causal"],
            "compiler_bos": BOS,
            "compiler_pad": PAD,
            "mlp_exactness": MLP_EXACTNESS,
            "script": "scripts/compile_tracr.py",
        },
        "vocabulary": vocab,
        "n_input_tokens": n_in,
        "input_length": n_in + 1,
        "input_format": f"[{BOS}, t1, ..., t{n_in}]: BOS (id {vocab['bos_id']}) at position 0, "
        f"then exactly {n_in} tokens from input_values; fixed length, no padding "
        f"(the pad id {vocab['pad_id']} exists in the vocabulary but is never used). Token "
        "ids are tracr's input-encoder ids.",
        "dataset": {
            "description": "Inputs: uniform random sequences over input_values "
            "(make_batches(n, batch_size, seed), torch.Generator, with replacement); the "
            "exhaustive set enumerates all of them "
            "(tracr_models.exhaustive_batches). Targets are computed by the task "
            "definition, not by the model.",
            "exhaustive_size": len(vocab["input_values"]) ** n_in,
            "scored_positions": list(range(1, n_in + 1)),
        },
    }
    if categorical:
        basis = _output_basis(compiled)
        classes = [str(d.value) for d in basis]
        # tracr's output classes: the output space's basis order (ascending values)
        assert compiled.assembled.output_encoder.encoding_map == {
            d.value: i for i, d in enumerate(basis)
        }
        assert sorted(classes) == sorted(vocab["input_values"])
        if task == "sort":
            assert [int(c) for c in classes] == sorted(int(c) for c in classes)
        card["output"] = {
            "type": "categorical",
            "classes": classes,
            "residual_labels": output_labels(compiled),
            "batch_key": "target",
            "note": "logits[..., c] is the residual stream's one-hot value for class c "
            "(W_U one-hot, no scaling): about 1 for the right class and 0 for the others, "
            "so the clean loss is not 0.",
        }
        card["metric"] = "loss"
        card["metrics"] = {
            "loss": "mean cross-entropy of logits against target over scored positions",
            "accuracy": "argmax(logits) == target over scored positions",
        }
    else:
        card["output"] = {
            "type": "numerical",
            "classes": None,
            "residual_labels": output_labels(compiled),
            "batch_key": "target_value",
            "note": "logits[..., 0] is the prediction (d_vocab_out = 1).",
        }
        card["metric"] = "mse"
        card["accuracy_tolerance"] = 0.01
        card["metrics"] = {
            "mse": "mean squared error of logits[..., 0] against target_value over scored "
            "positions",
            "accuracy": "|logits[..., 0] - target_value| < accuracy_tolerance (at position i "
            "the targets are multiples of 1/i, at least 0.2 apart)",
        }
        card["task_spec"] = {"count_token": "x"}
    card["units"] = all_units(model.cfg)
    return card


def _output_basis(compiled: Compiled):
    from tracr.compiler import nodes

    return compiled.sink[nodes.OUTPUT_BASIS]


def finish_card(
    card: dict[str, Any], compiled: Compiled, model: HookedTransformer, agreement: tuple[int, int]
) -> dict[str, Any]:
    """Components, the single-unit ablation study, and the ground truth computed by the
    library's public brute force (:func:`meanablate.organisms.ground_truth.add_ground_truth`,
    the same code path as ``from_tracr``)."""
    from meanablate.organisms.ground_truth import add_ground_truth
    from meanablate.organisms.registry import Organism

    components = program_components(compiled)
    per_pos = ablation_study(model, card, per_position=True)
    alone = per_pos.pop("ground_truth")
    per_pos["ablate_all_but_matter_alone"] = per_pos.pop("ablate_all_but_ground_truth")
    used = [c["unit"] for c in components]
    card["program_components"] = used
    card["components"] = components
    card["mean_ablation"] = {
        "mean": "per_position",
        "what": "single-unit study (per-position means): the metric with nothing ablated, "
        "with each unit ablated alone, the units whose ablation alone raises the metric "
        f"by more than {MATTERS_ATOL} (matter_alone), and with all other units ablated",
        **per_pos,
        "matter_alone": alone,
    }
    batch = tracr_models.exhaustive_batches(card, batch_size=10**9)[0]
    org = Organism(card["name"], model, lambda *a: [], card["metric"], card["units"], None, card)
    add_ground_truth(org, TARGET_FAITHFULNESS, len(card["units"]), batch=batch)
    card = dict(org.card)
    by_kind = card["ground_truth_by_mean_kind"]
    truth = card["ground_truth"]
    assert set(truth) <= set(used), (truth, used)
    for c in components:
        c["matters_under_mean_ablation"] = c["unit"] in truth
    excluded = [u for u in used if u not in truth]
    notes = [
        f"Converted model agrees with tracr on {agreement[0]}/{agreement[1]} inputs "
        "(the exhaustive set).",
        f"{model.cfg.n_layers} blocks x {model.cfg.n_heads} head(s); units include tracr's "
        "empty (all-zero) heads and MLPs, which the program does not use.",
        "ground_truth is the minimal circuit under per-position means (the organism's own "
        "mean kind, card['mean_kind']); ground_truth_by_mean_kind gives the minimal "
        "circuits under every mean kind.",
    ]
    if excluded:
        notes.append(
            "Used by the program but constant under per-position mean ablation on "
            f"fixed-length inputs, hence not in ground_truth: {', '.join(excluded)}."
        )
    for kind, result in by_kind.items():
        if result["circuits"] != [truth]:
            notes.append(f"Under {kind} means the minimal circuit(s) differ: {result['circuits']}.")
    notes += TASK_NOTES[compiled.task]
    card["notes"] = notes
    card["residual_labels"] = list(compiled.assembled.residual_labels)
    return card


TASK_NOTES = {
    "reverse": [
        "Program: length = SelectorWidth(Select(tokens, tokens, TRUE)) (block 0 head 0 + "
        "block 0 MLP); opp_idx = length - indices (block 1 MLP); opp_idx-1 = opp_idx - 1 "
        "(block 2 MLP); reverse = Aggregate(Select(indices, opp_idx-1, EQ), tokens) "
        "(block 3 head 0).",
        "All inputs have length 5, so length, opp_idx and opp_idx-1 are the same for every "
        "input at a given position: per-position mean ablation leaves them unchanged. Only "
        "the final head, which moves the token, matters.",
    ],
    "frac_prevs": [
        "Program: bools = numerical Map(tokens == 'x') (block 0 MLP); frac_prevs = "
        "numerical Aggregate(Select(indices, indices, LEQ), bools) (block 1 head 0), a mean "
        "over positions <= the query.",
        "Compiled with causal=True (the selector is causal anyway).",
    ],
    "sort": [
        "Program (lib.make_sort): keys = SequenceMap(tokens + indices / 5) makes keys unique "
        "(block 0 MLP); target_pos = SelectorWidth(Select(keys, keys, LT)) (block 1 head 0 "
        "+ block 1 MLP); sort = Aggregate(Select(target_pos, indices, EQ), tokens) (block 2 "
        "head 0).",
        "Repeated tokens are allowed (ties broken by position, so the sort is stable).",
    ],
}


# -- organisms built by the public API ---------------------------------------------------
def _program(task: str):
    from tracr.compiler import lib
    from tracr.rasp import rasp

    if task == "hist":
        return lib.make_hist()
    if task == "sort_unique":
        return lib.make_sort_unique(rasp.tokens, rasp.tokens)
    raise ValueError(task)


PROGRAMS: dict[str, dict[str, Any]] = {
    "hist": {
        "vocab": ["a", "b", "c"],
        "max_seq_len": 5,
        "description": "tracr-compiled RASP program lib.make_hist(): output position i "
        "(1..5) holds how many input tokens equal token i. The output classes (counts "
        "0..5) differ from the input vocabulary.",
    },
    "sort_unique": {
        "vocab": [1, 2, 3, 4, 5, 6],
        "max_seq_len": 4,
        "inputs": "distinct",
        "description": "tracr-compiled RASP program lib.make_sort_unique(tokens, tokens): "
        "sort inputs of distinct tokens. The program is undefined on repeats, so the data "
        "set is the 360 sequences of 4 distinct values from 1..6 (with all 6 values, or "
        "length 6, every sorted output would be the same: nothing to explain).",
    },
}


def build_program_organism(task: str):
    import itertools

    from tracr.rasp import rasp

    from meanablate.organisms import from_tracr

    # tracr numbers expressions with one global counter (labels like hist_15): restart it so
    # that the card does not depend on what was compiled before
    rasp.RASPExpr._ids = itertools.count(1)

    spec = dict(PROGRAMS[task])
    inputs = None
    if spec.pop("inputs", None) == "distinct":
        inputs = list(itertools.permutations(spec["vocab"], spec["max_seq_len"]))
    return from_tracr(
        _program(task),
        name=f"tracr-{task}",
        compiler_bos=BOS,
        compiler_pad=PAD,
        mlp_exactness=MLP_EXACTNESS,
        inputs=inputs,
        **spec,
    )


def write_programs(out: Path, check: bool) -> bool:
    from meanablate.organisms import tracr_program as api

    ok = True
    for task in PROGRAMS:
        org = build_program_organism(task)
        print(f"{task}: ground truth {org.card['ground_truth_by_mean_kind']}", file=sys.stderr)
        if check:
            shipped = api.load(out / f"tracr_{task}.json")
            same = shipped.card == json.loads(json.dumps(org.card)) and all(
                torch.equal(a, b)
                for a, b in zip(
                    shipped.model.state_dict().values(),
                    org.model.state_dict().values(),
                    strict=True,
                )
            )
            print(f"{task}: {'ok' if same else 'DIFFERS'}")
            ok &= same
        else:
            weights, card_path = api.save(org, out, f"tracr_{task}")
            weights.chmod(0o644)
            print(f"wrote {weights} ({weights.stat().st_size} B), {card_path}")
    return ok


# -- main ---------------------------------------------------------------------------
def build_all() -> dict[str, tuple[HookedTransformer, dict[str, Any], Compiled]]:
    out = {}
    for task in TASKS:
        compiled = compile_task(task)
        model = to_hooked_transformer(compiled)
        card = make_card(compiled, model)
        agreement = compare_with_tracr(compiled, model, card)
        card = finish_card(card, compiled, model, agreement)
        out[task] = (model, card, compiled)
        clean = card["mean_ablation"]["clean"]
        print(
            f"{task}: tracr agreement {agreement[0]}/{agreement[1]}, clean {clean}, "
            f"ground truth {card['ground_truth']}",
            file=sys.stderr,
        )
        if agreement[0] != agreement[1] or clean["accuracy"] != 1.0:
            raise SystemExit(f"{task}: conversion check failed")
    return out


def same_weights(path: Path, model: HookedTransformer) -> bool:
    """Whether ``path`` holds ``model``'s config and tensors, bit for bit."""
    if not path.exists():
        return False
    shipped = load_model(path)
    a, b = shipped.state_dict(), model.state_dict()
    return (
        shipped.cfg == model.cfg
        and a.keys() == b.keys()
        and all(torch.equal(a[k], b[k]) for k in a)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, don't write")
    parser.add_argument("--out", type=Path, default=DATA, help="output directory")
    parser.add_argument("--only", choices=[*TASKS, *PROGRAMS], nargs="*", help="only these tasks")
    args = parser.parse_args(argv)
    ok = True
    # tracr numbers unnamed expressions with one global counter: the hand-annotated cards'
    # labels assume these three are compiled first, in this order
    built = build_all() if not args.only or set(args.only) & set(TASKS) else {}
    for task, (model, card, _) in built.items():
        weights = args.out / f"tracr_{task}.safetensors"
        card_path = args.out / f"tracr_{task}.json"
        text = json.dumps(card, indent=2) + "\n"
        if args.check:
            same_card = card_path.exists() and card_path.read_text() == text
            same_w = same_weights(weights, model)
            print(
                f"{task}: card {'ok' if same_card else 'DIFFERS'}, "
                f"weights {'ok' if same_w else 'DIFFER'}"
            )
            ok &= same_card and same_w
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            if same_weights(weights, model):
                # safetensors' header order is not stable: rewriting equal tensors could
                # change the file's bytes, so an unchanged model keeps its file
                print(f"{weights}: weights unchanged, file kept")
            else:
                save_model(model, weights, extra={"card": card_path.name, "task": task})
                weights.chmod(0o644)
            card_path.write_text(text)
            print(f"wrote {weights} ({weights.stat().st_size} B), {card_path}")
    if not args.only or set(args.only) & set(PROGRAMS):
        ok &= write_programs(args.out, args.check)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
