"""Circuits of the shipped tracr organisms: per organism and mean kind, the circuit found,
its certificate and the wall time of discovery, as a markdown table.

Each organism runs on its whole data set (every input, one batch) with its own metric;
means of each kind (:data:`meanablate.stats.MEAN_KINDS`; ``plain_except`` keeps BOS,
position 0, on its own mean) are computed first and not timed. Discovery is
``discover(..., algorithm=ALGO)`` with the default algorithm (ACDC) unless ``--algorithm``
says otherwise, on one thread; the time is the median of ``--repeats`` runs and includes
the removal pass and the exhaustive check behind the certificate. ``= card`` says whether
the circuit is one of the minimal circuits the organism's card computed by brute force
(same target: ACDC's threshold 0.05 means faithfulness >= 0.95, the card's target).

Run: ``python benchmarks/bench_tracr_circuits.py [--algorithm acdc] [--threshold 0.05]
[--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from meanablate.discovery import ALGORITHMS, discover
from meanablate.organisms import registry, tracr_program
from meanablate.stats import MEAN_KINDS, compute_means

ORGANISMS = ["tracr-reverse", "tracr-frac_prevs", "tracr-sort", "tracr-sort_unique", "tracr-hist"]


def short(unit: str) -> str:
    """``blocks.3.attn.hook_z[heads=0]`` -> ``L3H0``; ``blocks.1.hook_mlp_out`` -> ``L1 MLP``."""
    layer = unit.split(".")[1]
    if "heads=" in unit:
        return f"L{layer}H{unit.split('heads=')[1].rstrip(']')}"
    return f"L{layer} MLP"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithm", default="acdc", choices=ALGORITHMS)
    parser.add_argument("--threshold", type=float, default=0.05, help="ACDC, relative")
    parser.add_argument("--target-faithfulness", type=float, default=0.95, help="others")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    acdc = args.algorithm == "acdc"
    print(
        f"algorithm {args.algorithm} ("
        + (f"threshold {args.threshold}" if acdc else f"target {args.target_faithfulness}")
        + f"), 1 thread, median of {args.repeats} runs, torch {torch.__version__}\n"
    )
    print("| organism | metric | mean kind | units | inputs | circuit | certificate "
          "| faithfulness | = card | discovery (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ORGANISMS:
        org = registry.load(name)
        batch = tracr_program.exhaustive_batch(org.card)
        for kind in MEAN_KINDS:
            keep = [0] if kind == "plain_except" else None
            means = compute_means(org.model, org.units, [batch], kind=kind, keep_positions=keep)
            times, circuit = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                circuit = discover(
                    org.model,
                    [batch],
                    means,
                    units=org.units,
                    metric=org.metric,
                    algorithm=args.algorithm,
                    threshold=args.threshold if acdc else None,
                    target_faithfulness=None if acdc else args.target_faithfulness,
                )
                times.append(time.perf_counter() - t0)
            assert circuit is not None
            minimal = org.card["ground_truth_by_mean_kind"][kind]["circuits"] or []
            same = any(set(c) == set(circuit.kept) for c in minimal)
            kept = ", ".join(short(u) for u in circuit.kept) or "(empty)"
            print(
                f"| {name} | {org.metric} | {kind} | {len(org.units)} | {len(batch['tokens'])} "
                f"| {kept} | {circuit.certificate} | {circuit.faithfulness:.4f} "
                f"| {'yes' if same else 'NO'} | {statistics.median(times):.3f} |"
            )


if __name__ == "__main__":
    main()
