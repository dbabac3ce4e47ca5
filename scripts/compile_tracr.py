#!/usr/bin/env python
"""Compile the shipped tracr organisms into ``src/meanablate/organisms/data/tracr_<task>.*``.

    python scripts/compile_tracr.py                 # (re)write the weights and cards
    python scripts/compile_tracr.py --check         # compile, compare with the shipped files
    python scripts/compile_tracr.py --only reverse  # one organism

A thin caller of the public API: every organism (:data:`ORGANISMS`) is built by
:func:`meanablate.organisms.from_tracr` (compile, convert, check against tracr on every
input, data set, metric, units, ground truth computed by brute force per mean kind) and
written by :func:`meanablate.organisms.tracr_program.save`. This script only names the
programs, their vocabularies and lengths, and adds hand-written notes on each program.

The shipped organisms keep the ``loss`` metric (cross-entropy) for categorical outputs
(``from_tracr``'s default is ``kl``): the demo, the docs and the tests were written for
it, and their ground truth is computed for it.

The output is deterministic: tracr numbers unnamed expressions with one global counter
(labels such as ``map_12``); it is restarted before each program, so an organism's
card does not depend on what was compiled before it.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from meanablate.organisms import from_tracr
from meanablate.organisms import tracr_program as api
from meanablate.organisms.transformer import load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "meanablate" / "organisms" / "data"

BOS = "BOS"
PAD = "compiler_pad"
MLP_EXACTNESS = 100


def _reverse():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_reverse(rasp.tokens)


def _frac_prevs():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_frac_prevs(rasp.tokens == "x")


def _sort():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=5, min_key=1)


def _hist():
    from tracr.compiler import lib

    return lib.make_hist()


def _sort_unique():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_sort_unique(rasp.tokens, rasp.tokens)


# task -> the program and what from_tracr needs beyond it; "rasp" is the program as text
# (for the card), "notes" hand-written card notes, "card" extra card fields
ORGANISMS: dict[str, dict[str, Any]] = {
    "reverse": {
        "program": _reverse,
        "rasp": "lib.make_reverse(rasp.tokens)",
        "vocab": ["a", "b", "c"],
        "max_seq_len": 5,
        "metric": "loss",
        "description": "Reverse the input: output position i (1..5) holds input token 6 - i.",
        "notes": [
            "Program: length = SelectorWidth(Select(tokens, tokens, TRUE)) (block 0 head 0 + "
            "block 0 MLP); opp_idx = length - indices (block 1 MLP); opp_idx-1 = opp_idx - 1 "
            "(block 2 MLP); reverse = Aggregate(Select(indices, opp_idx-1, EQ), tokens) "
            "(block 3 head 0).",
            "All inputs have length 5, so length, opp_idx and opp_idx-1 are the same for "
            "every input at a given position: per-position mean ablation leaves them "
            "unchanged. Only the final head, which moves the token, matters.",
        ],
    },
    "frac_prevs": {
        "program": _frac_prevs,
        "rasp": 'lib.make_frac_prevs(rasp.tokens == "x")',
        "vocab": ["a", "b", "c", "x"],
        "max_seq_len": 5,
        "causal": True,
        "description": "Running fraction of 'x' tokens: output position i (1..5) holds "
        "(number of 'x' among input tokens 1..i) / i.",
        "notes": [
            "Program: bools = numerical Map(tokens == 'x') (block 0 MLP); frac_prevs = "
            "numerical Aggregate(Select(indices, indices, LEQ), bools) (block 1 head 0), a "
            "mean over positions <= the query.",
            "Compiled with causal=True (the selector is causal anyway).",
        ],
        "card": {"task_spec": {"count_token": "x"}},
    },
    "sort": {
        "program": _sort,
        "rasp": "lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=5, min_key=1)",
        "vocab": [1, 2, 3, 4, 5],
        "max_seq_len": 5,
        "metric": "loss",
        "description": "Sort the input (ascending, stable; repeats allowed): output "
        "position i (1..5) holds the i-th smallest input token.",
        "notes": [
            "Program (lib.make_sort): keys = SequenceMap(tokens + indices / 5) makes keys "
            "unique (block 0 MLP); target_pos = SelectorWidth(Select(keys, keys, LT)) (block "
            "1 head 0 + block 1 MLP); sort = Aggregate(Select(target_pos, indices, EQ), "
            "tokens) (block 2 head 0).",
            "Repeated tokens are allowed (ties broken by position, so the sort is stable).",
        ],
    },
    "hist": {
        "program": _hist,
        "rasp": "lib.make_hist()",
        "vocab": ["a", "b", "c"],
        "max_seq_len": 5,
        "metric": "loss",
        "description": "Output position i (1..5) holds how many input tokens equal token i. "
        "The output classes (counts 0..5) differ from the input vocabulary.",
    },
    "sort_unique": {
        "program": _sort_unique,
        "rasp": "lib.make_sort_unique(rasp.tokens, rasp.tokens)",
        "vocab": [1, 2, 3, 4, 5, 6],
        "max_seq_len": 4,
        "metric": "loss",
        "distinct": True,
        "description": "Sort inputs of distinct tokens. The program is undefined on "
        "repeats, so the data set is the 360 sequences of 4 distinct values from 1..6 "
        "(with all 6 values, or length 6, every sorted output would be the same: nothing "
        "to explain).",
    },
}


def build_program(task: str) -> Any:
    """The RASP program of ``task``, with tracr's expression counter restarted."""
    from tracr.rasp import rasp

    rasp.RASPExpr._ids = itertools.count(1)
    program: Callable[[], Any] = ORGANISMS[task]["program"]
    return program()


def build(task: str) -> api.Organism:
    """The organism of ``task``, built by :func:`from_tracr`, with its notes."""
    spec = ORGANISMS[task]
    inputs = None
    if spec.get("distinct"):
        inputs = list(itertools.permutations(spec["vocab"], spec["max_seq_len"]))
    org = from_tracr(
        build_program(task),
        vocab=spec["vocab"],
        max_seq_len=spec["max_seq_len"],
        causal=spec.get("causal", False),
        compiler_bos=BOS,
        compiler_pad=PAD,
        mlp_exactness=MLP_EXACTNESS,
        name=f"tracr-{task}",
        description=f"tracr-compiled RASP program {spec['rasp']}. {spec['description']}",
        inputs=inputs,
        metric=spec.get("metric"),
    )
    card = dict(org.card)
    card["source"] = {**card["source"], "rasp": spec["rasp"], "script": "scripts/compile_tracr.py"}
    card.update(spec.get("card", {}))
    if spec.get("notes"):
        card["notes"] = list(spec["notes"])
    org.card = card
    return org


def same_weights(path: Path, model: torch.nn.Module) -> bool:
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
    parser.add_argument("--only", choices=list(ORGANISMS), nargs="*", help="only these tasks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ok = True
    for task in args.only or ORGANISMS:
        org = build(task)
        check = org.card["tracr_check"]
        print(
            f"{task}: agrees with tracr on {check['agree']}/{check['inputs']}, ground truth "
            f"{org.card['ground_truth']}",
            file=sys.stderr,
        )
        weights = args.out / f"tracr_{task}.safetensors"
        card_path = args.out / f"tracr_{task}.json"
        text = api.card_json(org.card)
        if args.check:
            same_card = card_path.exists() and card_path.read_text() == text
            same_w = same_weights(weights, org.model)
            print(
                f"{task}: card {'ok' if same_card else 'DIFFERS'}, "
                f"weights {'ok' if same_w else 'DIFFER'}"
            )
            ok &= same_card and same_w
        elif same_weights(weights, org.model):
            # safetensors' header order is not stable: rewriting equal tensors could change
            # the file's bytes, so an unchanged model keeps its file
            card_path.write_text(text)
            print(f"{weights}: weights unchanged, file kept; wrote {card_path}")
        else:
            weights, card_path = api.save(org, args.out, f"tracr_{task}")
            weights.chmod(0o644)
            print(f"wrote {weights} ({weights.stat().st_size} B), {card_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
