"""ACDC over edges on tracr-reverse: auto-circuit 1.0.1 and meanablate side by side.

Optional, and outside the test suite: auto-circuit pins TransformerLens 2.x (and numpy 1),
which cannot share an environment with meanablate's TransformerLens 4, so this script runs
each tool in its own interpreter and prints one table.

Setup of the separate environment (once; CPU torch from the project's constraints)::

    python3 -m venv /work/acvenv
    /work/acvenv/bin/pip install -c constraints.txt torch==2.13.0 \
        "transformer-lens==2.18.*" auto-circuit==1.0.1 tracr-pypi
    # TransformerLens 2.18 pins numpy<2, which today's pyarrow and datasets refuse:
    /work/acvenv/bin/pip install "pyarrow<19" "datasets<4"

Run (from the repository root; ``--ours-python`` defaults to the running interpreter, and
``src/`` is put on its path)::

    python benchmarks/compare_auto_circuit.py --ac-python /work/acvenv/bin/python \
        [--source mean|zero] [--repeats 3] [--save results.json]

Measured 2026-11-30 on the 2-core machine (CPU seconds, one torch thread, best of 3,
progress bars off), mean ablation: identical logits (max |diff| 0); the 77 single-edge KL
effects agree to 1.3e-8; the same edges kept at every threshold. auto-circuit: 15.9 s
(token circuit, 462 edges, AUROC 0.998), 3.7 s (the same on 11 inputs, its own task's
batch), 2.19 s (77 edges, AUROC 1.0); meanablate 0.23-0.26 s (77 edges, AUROC 1.0), 8.4-9.3x
faster on the same graph (two runs). auto-circuit's 0.998 comes from its ground truth, not its
search: for the token circuit the truth lists positions 1, 2, 4, 5 only, but under mean
ablation both true edges matter at the middle position 3 too, so 2 of its 454 negatives
tie with the 8 positives: 1 - 1/454 = 0.9978. ``--source zero`` (one repeat): both keep
the same 8 edges at every threshold (in auto-circuit's hash order and in ours), the effects
agree to 1.1e-8; auto-circuit 2.23 s on 77 edges, meanablate 0.69 s.

What is compared (both on the exhaustive 243 inputs, KL(clean || ablated) averaged over
the scored positions 1..5, per-position mean ablation, thresholds 1e-6 .. 1e-3):

- **the model**: auto-circuit compiles ``length - indices - 1`` itself (vocabulary
  {1, 2, 3}); our shipped organism is ``lib.make_reverse`` over {a, b, c}. Token ids and the
  order of residual dimensions differ, the function does not: the logits on all 243 inputs
  are compared with the tokens mapped 1->a, 2->b, 3->c.
- **the graph**: the same 77 edges (input, 4 heads with q/k/v inputs, 4 MLPs, logits; the
  empty tracr heads and MLPs included). auto-circuit's tracr task is a *token circuit*: every
  edge exists once per position, 77 x 6 = 462 edges. Both granularities are run.
- **single-edge effects**: the KL of ablating each of the 77 edges alone, in each tool.
- **ACDC**: wall time of the four thresholds (auto-circuit's ``acdc_prune_scores`` with
  ``tao_exps=[-6..-3]``, ``tao_bases=[1]``; ours ``discover_edges`` once per threshold
  sharing one ``EdgeData``), the edges kept at each threshold, and the edge AUROC against
  each tool's tracr ground truth: auto-circuit's score (the smallest threshold at which an
  edge was pruned, inf if never) and its own ROC code; ours per threshold and with the
  same "smallest pruning threshold" score.

``--source zero`` runs the same comparison with zero ablation, where ten edges matter
(mean ablation leaves only two: every input has length 5, so the length computation is
constant under per-position means). auto-circuit's ACDC visits edges sorted by
destination layer only; within a layer the order is a Python set's, which changes with
``PYTHONHASHSEED`` (the script fixes it to 0 unless exported). Its kept edges are also
computed with its edge set re-ordered into ours (Conmy et al.'s reverse topological
order), where the two ACDCs must keep the same edges.

auto-circuit's ACDC always patches with the resample ablation of the batch's *corrupt*
prompts (``src_ablations(model, corrupt_batch)``). For mean ablation this script hands it
the per-position batch mean instead (``AblationType.BATCH_TOKENWISE_MEAN`` on the whole
exhaustive batch), by wrapping ``auto_circuit.prune_algos.ACDC.src_ablations`` for the
duration of the call; the algorithm itself runs unchanged.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

THRESHOLDS = (1e-6, 1e-5, 1e-4, 1e-3)
ROOT = Path(__file__).resolve().parent.parent


def _best(fn: Any, repeats: int) -> tuple[float, float, Any]:
    """(best process seconds, best wall seconds, last result) over ``repeats`` calls."""
    cpu, wall, out = math.inf, math.inf, None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        cpu, wall = min(cpu, time.process_time() - c0), min(wall, time.perf_counter() - w0)
    return cpu, wall, out


def _mw_auroc(scores: list[float], truth: list[bool]) -> float:
    """Mann-Whitney AUROC of ``|score|`` (ties one half); an independent check."""
    pos = [abs(s) for s, t in zip(scores, truth) if t]
    neg = [abs(s) for s, t in zip(scores, truth) if not t]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def _ours_name(ac_name: str) -> str:
    """auto-circuit's edge name in our naming (``A0.0->A1.0.Q`` -> ``a0.h0->a1.h0<q>``)."""

    def node(n: str) -> str:
        if n == "Resid Start":
            return "input"
        if n == "Resid End":
            return "logits"
        if n.startswith("MLP "):
            return f"m{n[4:]}"
        layer, rest = n[1:].split(".", 1)
        head, _, qkv = rest.partition(".")
        return f"a{layer}.h{head}" + (f"<{qkv.lower()}>" if qkv else "")

    src, dst = ac_name.split("->")
    return f"{node(src)}->{node(dst)}"


def _conmy_order(name: str) -> tuple:
    """Sort key (descending) of our ACDC order: destinations from the logits back (a
    head's q, k, v inputs in that order before reversal), then the latest source first."""

    def node(n: str) -> tuple[int, int, int]:
        if n == "input":
            return (-1, 0, 0)
        if n == "logits":
            return (1 << 30, 2, 0)
        if n.startswith("m"):
            return (int(n[1:]), 1, 0)
        layer, head = n[1:].split(".h")
        return (int(layer), 0, int(head))

    src, dst = name.split("->")
    qkv = "qkv".index(dst[-2]) if dst.endswith(">") else 0
    return (*node(dst.split("<")[0]), qkv, *node(src))


# -- auto-circuit (run under the separate environment) --------------------------------
def side_auto_circuit(repeats: int, source: str) -> dict[str, Any]:
    import copy
    import importlib
    import inspect

    import torch as t
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.metrics.area_under_curve import measurements_auc
    from auto_circuit.metrics.official_circuits.circuits.tracr.reverse_official import (
        tracr_reverse_true_edges,
    )
    from auto_circuit.metrics.official_circuits.measure_roc import measure_task_roc
    from auto_circuit.model_utils.tracr_model_utils import get_tracr_model
    from auto_circuit.types import AblationType
    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.utils.graph_utils import patch_mode, patchable_model, set_all_masks
    from auto_circuit.utils.tensor_ops import multibatch_kl_div
    from ordered_set import OrderedSet

    t.set_num_threads(1)
    kind = AblationType.ZERO if source == "zero" else AblationType.BATCH_TOKENWISE_MEAN
    acdc_mod = importlib.import_module("auto_circuit.prune_algos.ACDC")
    src = inspect.getsource(acdc_mod.acdc_prune_scores)
    first, second = (
        src.find("src_ablations(model, corrupt_batch)"),
        src.find("src_ablations(model, clean_batch)"),
    )
    assert 0 <= first < second, "auto-circuit's ACDC changed: the mean-ablation wrap is invalid"

    tl, tracr = get_tracr_model("reverse", "cpu")
    rows = [["BOS", *r] for r in itertools.product([1, 2, 3], repeat=5)]
    clean = t.tensor([tracr.input_encoder.encode(r) for r in rows])
    with t.inference_mode():
        logits = tl(clean)

    def loader(seq_len: int | None, n: int) -> PromptDataLoader:
        # n < 243: a random subset, as auto-circuit's own task uses (batches of 11)
        pick = t.randperm(len(clean), generator=t.Generator().manual_seed(0))[:n]
        toks = clean if n == len(clean) else clean[pick]
        answers = [t.tensor([0])] * len(toks)
        ds = PromptDataset(toks, toks.clone(), answers, answers)
        return PromptDataLoader(ds, seq_len=seq_len, diverge_idx=0, batch_size=len(toks))

    def patchable(seq_len: int | None) -> Any:
        m = copy.deepcopy(tl)
        m.cfg.use_attn_result = m.cfg.use_split_qkv_input = m.cfg.use_hook_mlp_in = True
        m.eval()
        for p in m.parameters():
            p.requires_grad = False
        return patchable_model(
            m,
            factorized=True,
            slice_output="not_first_seq",
            seq_len=seq_len,
            separate_qkv=True,
            device=t.device("cpu"),
        )

    def acdc(pm: Any, dl: PromptDataLoader, exps: list[int]) -> Any:
        orig, calls = acdc_mod.src_ablations, [0]

        def mean_for_corrupt(model: Any, sample: Any, ablation_type: Any = None) -> Any:
            calls[0] += 1  # ACDC asks for the corrupt batch first, then the clean one
            if calls[0] % 2 == 1:
                return orig(model, sample, kind)
            return orig(model, sample, ablation_type or AblationType.RESAMPLE)

        acdc_mod.src_ablations = mean_for_corrupt
        try:
            return acdc_mod.acdc_prune_scores(pm, dl, None, tao_exps=exps, tao_bases=[1])
        finally:
            acdc_mod.src_ablations = orig

    out: dict[str, Any] = {"logits": logits.tolist(), "runs": {}, "source": source}
    exps = [round(math.log10(x)) for x in THRESHOLDS]
    runs = (("token circuit", 6, 243), ("token circuit, 11 inputs", 6, 11))
    for label, seq_len, n in (*runs, ("all positions", None, 243)):
        pm, dl = patchable(seq_len), loader(seq_len, n)
        cpu, wall, scores = _best(lambda pm=pm, dl=dl: acdc(pm, dl, exps), repeats)
        truth = tracr_reverse_true_edges(pm, token_positions=seq_len is not None)
        roc = measurements_auc(measure_task_roc(pm, truth, scores), False, False, None)
        flat = [(e, float(e.prune_score(scores))) for e in pm.edges]
        mw = _mw_auroc([s for _, s in flat], [e in truth for e, _ in flat])
        kept = {}
        for x, ex in zip(THRESHOLDS, exps):  # each threshold alone, untimed
            s1 = acdc(pm, dl, [ex])
            kept[str(x)] = sorted(
                _ours_name(e.name) + (f"@{e.seq_idx}" if e.seq_idx is not None else "")
                for e in pm.edges
                if math.isinf(float(e.prune_score(s1)))
            )
        out["runs"][label] = {
            "edges": pm.n_edges,
            "inputs": n,
            "cpu_s": cpu,
            "wall_s": wall,
            "auroc": roc,
            "auroc_mw": mw,
            "truth": sorted(_ours_name(e.name) for e in truth),
            "kept": kept,
        }
        if seq_len is None:  # single-edge KL effects on the 77-edge graph
            batch = next(iter(dl))
            patch = src_ablations(pm, batch.clean, kind)
            with t.inference_mode():
                ref = t.log_softmax(pm(batch.clean)[pm.out_slice].double(), -1)
                effects = {}
                for e in pm.edges:
                    with patch_mode(pm, patch, edges=[e]):
                        lp = t.log_softmax(pm(batch.clean)[pm.out_slice].double(), -1)
                    effects[_ours_name(e.name)] = float(multibatch_kl_div(lp, ref))
                set_all_masks(pm, 0.0)
            out["effects"] = effects
            # auto-circuit visits edges sorted by destination layer only; within a layer
            # the order is a set's (it changes with PYTHONHASHSEED). Given our order, its
            # ACDC must keep exactly our edges.
            by_name = {_ours_name(e.name): e for e in pm.edges}
            pm.edges = OrderedSet(
                by_name[n] for n in sorted(by_name, key=_conmy_order, reverse=True)
            )
            out["kept_in_our_order"] = {}
            for x, ex in zip(THRESHOLDS, exps):
                s1 = acdc(pm, dl, [ex])
                out["kept_in_our_order"][str(x)] = sorted(
                    _ours_name(e.name) for e in pm.edges if math.isinf(float(e.prune_score(s1)))
                )
    return out


# -- meanablate (run under the project's environment) ---------------------------------
def side_ours(repeats: int, source: str) -> dict[str, Any]:
    import torch

    from meanablate.discovery import (
        EdgeData,
        discover_edges,
        edge_auroc,
        edge_ground_truth,
        edge_sweep,
    )
    from meanablate.organisms import registry
    from meanablate.organisms.tracr_models import exhaustive_batches

    torch.set_num_threads(1)
    org = registry.load("tracr-reverse")
    ids = org.card["vocabulary"]["ids"]
    batches = exhaustive_batches(org.card)
    tokens = torch.cat([b["tokens"] for b in batches])
    expect = [[ids["BOS"], *(ids[v] for v in r)] for r in itertools.product("abc", repeat=5)]
    assert tokens.tolist() == expect, "exhaustive_batches is not in itertools.product order"
    truth = edge_ground_truth(org)
    src = "zero" if source == "zero" else "mean-positional"
    order = [e.name for e in EdgeData(org.model, batches[:1], src).graph.reverse_topological()]
    assert order == sorted(order, key=_conmy_order, reverse=True), "our ACDC order changed"

    def run() -> list:
        data = EdgeData(org.model, batches, src)
        return [discover_edges(org.model, data, metric="kl", abs_threshold=x) for x in THRESHOLDS]

    cpu, wall, circuits = _best(run, repeats)
    names = circuits[0].units
    # auto-circuit's score: the smallest threshold at which an edge was pruned, inf if never
    pruned_at = {n: math.inf for n in names}
    for x, c in zip(THRESHOLDS, circuits):
        for n in set(names) - set(c.kept):
            pruned_at[n] = min(pruned_at[n], x)
    with torch.inference_mode():
        logits = org.model(tokens)
    effects = edge_sweep(org.model, EdgeData(org.model, batches, src), metric="kl")
    return {
        "logits": logits.tolist(),
        "runs": {
            "all positions": {
                "edges": len(names),
                "inputs": len(tokens),
                "cpu_s": cpu,
                "wall_s": wall,
                "auroc": edge_auroc(pruned_at, truth),
                "auroc_mw": _mw_auroc([pruned_at[n] for n in names], [n in truth for n in names]),
                "auroc_each": [edge_auroc(c.scores, truth) for c in circuits],
                "truth": sorted(truth),
                "kept": {str(x): sorted(c.kept) for x, c in zip(THRESHOLDS, circuits)},
            }
        },
        "effects": effects.as_dict(),
    }


# -- side by side ---------------------------------------------------------------------
def _run_side(
    python: str, side: str, repeats: int, source: str, pythonpath: str | None
) -> dict[str, Any]:
    # auto-circuit's ACDC order within a layer follows set iteration, i.e. str hashes:
    # a fixed seed makes its run repeatable (override by exporting PYTHONHASHSEED)
    env = dict(os.environ, TQDM_DISABLE="1")
    env.setdefault("PYTHONHASHSEED", "0")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [python, str(Path(__file__).resolve()), "--side", side, "--repeats", str(repeats)]
    cmd += ["--source", source]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{side} side failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(ac: dict[str, Any], ours: dict[str, Any]) -> None:
    import numpy as np

    # auto-circuit's ids: 1, 2, 3 -> 0, 1, 2 and BOS -> 3; ours: BOS 0, a 1, b 2, c 3.
    diff = np.abs(np.array(ac["logits"]) - np.array(ours["logits"])).max()
    print(f"logits on the 243 inputs (tokens mapped 1->a, 2->b, 3->c): max |diff| {diff:.2e}")
    what = "zero" if ac.get("source") == "zero" else "per-position mean"
    print(f"\nACDC over edges, tracr-reverse, 243 inputs, KL, {what} ablation, 4 thresholds")
    print(f"{'tool / graph':44} {'edges':>5} {'cpu s':>7} {'wall s':>7} {'AUROC':>6}  kept")
    rows = [("auto-circuit 1.0.1 / " + k, v) for k, v in ac["runs"].items()]
    rows += [("meanablate / " + k, v) for k, v in ours["runs"].items()]
    for label, r in rows:
        sizes = "/".join(str(len(r["kept"][str(x)])) for x in THRESHOLDS)
        print(
            f"{label:44} {r['edges']:>5} {r['cpu_s']:>7.3f} {r['wall_s']:>7.3f} "
            f"{r['auroc']:>6.3f}  {sizes}  (Mann-Whitney AUROC {r['auroc_mw']:.3f})"
        )
    o = ours["runs"]["all positions"]
    print(f"meanablate AUROC per threshold: {[round(a, 4) for a in o['auroc_each']]}")
    a = ac["runs"]["all positions"]
    print(f"ground truth: auto-circuit {a['truth']}; meanablate {o['truth']}")
    for x in THRESHOLDS:
        ka, ko = a["kept"][str(x)], o["kept"][str(x)]
        same = "same" if ka == ko else f"differ: auto-circuit {ka}, meanablate {ko}"
        print(f"  kept at {x:g} (77 edges): {same}")
    for x in THRESHOLDS:
        ka, ko = ac["kept_in_our_order"][str(x)], o["kept"][str(x)]
        same = "same" if ka == ko else f"differ: auto-circuit {ka}, meanablate {ko}"
        print(f"  kept at {x:g}, auto-circuit visiting edges in our order: {same}")
    ea, eo = ac["effects"], ours["effects"]
    assert set(ea) == set(eo), f"edge sets differ: {sorted(set(ea) ^ set(eo))}"
    worst = max(ea, key=lambda n: abs(ea[n] - eo[n]))
    top = sorted(eo, key=lambda n: -abs(eo[n]))[:6]
    print(
        f"single-edge KL effects, 77 edges: max |diff| {abs(ea[worst] - eo[worst]):.2e} "
        f"(at {worst})"
    )
    for n in top:
        print(f"  {n:22} auto-circuit {ea[n]:.6g}  meanablate {eo[n]:.6g}")
    tok = ac["runs"]["token circuit"]
    print(
        f"auto-circuit token circuit: kept at every threshold {tok['kept'][str(THRESHOLDS[0])]}; "
        f"its ground truth holds {len(tok['truth'])} edges (positions 1, 2, 4, 5 only)"
    )
    print("\nCPU time, auto-circuit / meanablate (meanablate: 77 edges, 243 inputs):")
    for label, r in ac["runs"].items():
        print(f"  {label:28} {r['cpu_s'] / o['cpu_s']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("auto-circuit", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--ac-python", default="/work/acvenv/bin/python")
    parser.add_argument("--ours-python", default=sys.executable)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--source",
        choices=("mean", "zero"),
        default="mean",
        help="ablation: per-position mean over the 243 inputs (the issue's), or zero",
    )
    parser.add_argument("--save", type=Path, help="write both sides' raw results (JSON) here")
    parser.add_argument("--load", type=Path, help="only print the report of a --save file")
    args = parser.parse_args()
    if args.side == "auto-circuit":
        print(json.dumps(side_auto_circuit(args.repeats, args.source)))
    elif args.side == "ours":
        print(json.dumps(side_ours(args.repeats, args.source)))
    elif args.load:
        saved = json.loads(args.load.read_text())
        report(saved["auto-circuit"], saved["ours"])
    else:
        src = str(ROOT / "src")
        ac = _run_side(args.ac_python, "auto-circuit", args.repeats, args.source, None)
        ours = _run_side(args.ours_python, "ours", args.repeats, args.source, src)
        if args.save:
            args.save.write_text(json.dumps({"auto-circuit": ac, "ours": ours}))
        report(ac, ours)


if __name__ == "__main__":
    main()
