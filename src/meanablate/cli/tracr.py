"""``meanablate tracr PROGRAM``: compile your own RASP program into an organism.

PROGRAM is ``module:name`` or ``file.py:name``: a tracr RASP ``SOp``, or a function that
takes no arguments and returns one. The organism (weights + card, with its data set and
its ground truth computed per mean kind) is written to ``--out`` and can then be run with
``meanablate discover --organism DIR/NAME.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meanablate.cli.custom import import_user_module
from meanablate.cli.errors import one_line
from meanablate.config import InputError

__all__ = ["parse_vocab", "run_tracr"]


def parse_vocab(text: str) -> list[Any]:
    """``"a,b,c"`` -> ``["a", "b", "c"]``; all-integer lists become ints (``"1,2"``)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InputError(f"--vocab {text!r}: expected comma-separated values, e.g. a,b,c")
    try:
        return [int(t) for t in items]
    except ValueError:
        return items


def _program(spec: str) -> Any:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr.isidentifier():
        raise InputError(f"PROGRAM {spec}: expected module:name or file.py:name")
    try:
        module = import_user_module(module_name, f"PROGRAM {spec}")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"PROGRAM {spec}: importing {module_name}: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise InputError(f"PROGRAM {spec}: {module_name} has no {attr!r}")
    from tracr.rasp import rasp

    if not isinstance(obj, rasp.SOp) and callable(obj):
        obj = obj()
    if not isinstance(obj, rasp.SOp):
        raise InputError(f"PROGRAM {spec}: expected a RASP SOp, got {type(obj).__name__}")
    return obj


def run_tracr(
    spec: str,
    vocab: str,
    max_seq_len: int,
    *,
    out: Path,
    name: str | None,
    causal: bool,
    sample: int | None,
    max_inputs: int,
    log: Any,
    target_faithfulness: float = 0.95,
    metric: str | None = None,
) -> Path:
    """Compile, check, write ``out/<name>.safetensors`` and ``.json``; the card's path."""
    from meanablate.organisms import from_tracr, tracr_program

    program = _program(spec)
    stem = (name or f"tracr-{spec.rpartition(':')[2]}").replace("-", "_")
    log(f"compiling {spec} with tracr (vocab {vocab}, max_seq_len {max_seq_len})")
    try:
        org = from_tracr(
            program,
            vocab=parse_vocab(vocab),
            max_seq_len=max_seq_len,
            causal=causal,
            sample=sample,
            max_inputs=max_inputs,
            name=name or stem.replace("_", "-"),
            target_faithfulness=target_faithfulness,
            metric=metric,  # type: ignore[arg-type]  # from_tracr checks it
        )
    except (ValueError, TypeError) as exc:
        raise InputError(f"PROGRAM {spec}: {one_line(exc)}") from exc
    _, card_path = tracr_program.save(org, out, stem)
    card = org.card
    check = card["tracr_check"]
    print(
        f"{org.name}: {len(org.units)} units, {card['dataset']['size']} inputs, "
        f"agrees with tracr on {check['agree']}/{check['inputs']}; metric {org.metric}"
    )
    for kind, gt in (card.get("ground_truth_by_mean_kind") or {}).items():
        circuits = gt.get("circuits")
        shown = "; ".join(", ".join(c) or "(empty)" for c in circuits) if circuits else "n/a"
        print(f"  minimal circuit(s), {kind} means: {shown}")
    print(f"wrote {card_path}\nnext: meanablate discover --organism {card_path}")
    return card_path
