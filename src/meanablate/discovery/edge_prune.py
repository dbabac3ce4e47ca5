"""Edge circuits: ACDC over edges, and score-then-prune on edge scores.

One signature and one result type with the node algorithms (:func:`discover`,
:class:`Circuit`): ``Circuit.units`` are edge names and ``kept`` the edges of the circuit.

- ``"acdc"`` (Conmy et al. 2023, Algorithm 1): walk the destinations from the logits
  backwards (reverse topological order), and each destination's incoming edges from the
  latest source; ablate an edge for good if the metric rises by less than the threshold
  over the current circuit's (ACDC's signed test, ``m(new) - m(current) < threshold``).
  As in :func:`~meanablate.discovery.discover`, ``threshold`` is relative to
  ``|m(full) - m(empty)|`` and ``abs_threshold`` is in the metric's own units (ACDC's and
  auto-circuit's thresholds, e.g. ``1e-6 .. 1e-3`` of KL, are absolute).
  Each trial resumes the forward at the edge's destination layer from the current
  circuit's cached stream, since nothing upstream of it changes.
- ``"sweep"`` / ``"eap"`` / ``"eap_ig"``: rank edges by the exact edge sweep, EAP or
  EAP-IG and keep the smallest top set whose faithfulness reaches
  ``target_faithfulness``; ``"attribute_verify"``: rank by EAP (EAP-IG for comparing
  metrics), re-measure the top edges exactly, grow the verified set until it reaches a
  margin past the circuit's lowest-ranked edge in EAP's order (:func:`_attribute_verify`).

Every search's evaluations of a circuit run only the nodes it keeps alive
(:func:`~meanablate.discovery.edge_circuit.circuit_metric`, smooth metrics).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from meanablate.discovery.eap import eap, eap_ig
from meanablate.discovery.edge_circuit import circuit_metric
from meanablate.discovery.edge_sweep import edge_sweep
from meanablate.discovery.edges import EdgeData
from meanablate.discovery.prune import Circuit, _prune_to_target, _verified
from meanablate.discovery.scores import Scores
from meanablate.discovery.source import Source
from meanablate.metrics import Metric, get_metric

__all__ = ["EDGE_ALGORITHMS", "discover_edges"]

EdgeAlgorithm = Literal["acdc", "sweep", "eap", "eap_ig", "attribute_verify"]
EDGE_ALGORITHMS: tuple[str, ...] = ("acdc", "sweep", "eap", "eap_ig", "attribute_verify")

# attribute_verify: verify the top VERIFY_START of the edges by EAP first, and at least
# VERIFY_PAST edges past the circuit's lowest-ranked member in EAP's order
VERIFY_START = 0.03
VERIFY_PAST = 4


def discover_edges(
    model: nn.Module,
    batches: Iterable[Any] | EdgeData,
    source: Source | str = "mean",
    *,
    metric: str | Metric = "kl",
    algorithm: EdgeAlgorithm = "acdc",
    threshold: float | None = None,
    abs_threshold: float | None = None,
    target_faithfulness: float = 0.95,
    split_qkv: bool = True,
    ig_steps: int = 5,
    verify_top: int | None = None,
) -> Circuit:
    """Find a small set of edges that keeps the model's behaviour under ``metric``.

    ``threshold`` (ACDC only, in [0, 1)): the largest rise of the metric an edge's
    ablation may cause and still be removed, as a fraction of ``|m(full) - m(empty)|``;
    or ``abs_threshold`` (>= 0) in the metric's units. ``target_faithfulness`` in (0, 1]: what
    score-based pruning must reach.

    >>> from meanablate.organisms import registry
    >>> from meanablate.organisms.tracr_models import exhaustive_batches
    >>> org = registry.load("tracr-reverse")
    >>> c = discover_edges(org.model, exhaustive_batches("reverse"), "mean-positional",
    ...                    metric="kl", abs_threshold=1e-4)
    >>> sorted(c.kept)
    ['a3.h0->logits', 'input->a3.h0<v>']
    """
    if algorithm not in EDGE_ALGORITHMS:
        raise ValueError(
            f"unknown algorithm {algorithm!r}; choose one of {', '.join(EDGE_ALGORITHMS)}"
        )
    if not (0 < target_faithfulness <= 1):
        raise ValueError(f"target_faithfulness must lie in (0, 1], got {target_faithfulness}")
    if algorithm == "acdc":
        if (threshold is None) == (abs_threshold is None):
            raise ValueError(
                "ACDC needs exactly one of threshold (relative to |m(full) - m(empty)|, in "
                f"[0, 1)) and abs_threshold (>= 0, in the metric's units); got "
                f"threshold={threshold}, abs_threshold={abs_threshold}"
            )
        if threshold is not None and not (0 <= threshold < 1):
            raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
        if abs_threshold is not None and not (math.isfinite(abs_threshold) and abs_threshold >= 0):
            raise ValueError(f"abs_threshold must be finite and >= 0, got {abs_threshold}")
    elif threshold is not None or abs_threshold is not None:
        raise ValueError(f"{algorithm!r} prunes to target_faithfulness; thresholds are for acdc")
    t0 = time.perf_counter()
    m = get_metric(metric)
    data = (
        batches
        if isinstance(batches, EdgeData)
        else EdgeData(model, batches, source, split_qkv=split_qkv)
    )
    names = data.graph.names
    # Evaluated sets live on `data`: runs at several thresholds share them.
    memo: dict[frozenset[int], float] = data.cache.setdefault(("set", m.name, id(m.fn)), {})

    def value(ablated: list[str]) -> float:
        idx = frozenset(data.graph.indices(ablated))
        if idx not in memo:
            mask = torch.zeros(len(names))
            mask[list(idx)] = 1
            # from the nodes the circuit keeps alive (smooth metrics; a fraction of the
            # masked forward for small circuits), else the masked forward itself
            fast = circuit_metric(data, mask == 0, m)
            memo[idx] = float((fast if fast is not None else data.metric_of(mask, m)).mean())
        return memo[idx]

    # The full model's output is each batch's clean run: its metric needs no forward.
    memo[frozenset()] = float(
        torch.cat([m(it.clean, it.batch, it.clean).double().cpu() for it in data.items]).mean()
    )
    m_full, m_empty = value([]), value(names)
    if algorithm == "acdc":
        absolute = (
            abs_threshold if abs_threshold is not None else threshold * abs(m_full - m_empty)  # type: ignore[operator]
        )
        circuit = _acdc_edges(data, m, float(absolute))
        circuit.metric_full, circuit.metric_empty = m_full, m_empty
        # ACDC tracked effects: for task metrics the change from the full model's value.
        if not m.compares:
            circuit.metric_circuit += m_full
        circuit.threshold = threshold
        circuit.abs_threshold = float(absolute)
    elif algorithm == "attribute_verify":
        circuit = _attribute_verify(
            data, m, ig_steps, verify_top, value, m_full, m_empty, target_faithfulness
        )
    else:
        scores = _rank(data, m, algorithm, ig_steps)
        circuit = _prune_to_target(names, scores, value, m_full, m_empty, target_faithfulness)
    circuit.algorithm, circuit.metric = algorithm, m.name
    circuit.seconds = time.perf_counter() - t0
    return circuit


def _rank(data: EdgeData, m: Metric, algorithm: str, ig_steps: int) -> Scores:
    model = data.model
    if algorithm == "sweep":
        return edge_sweep(model, data, metric=m)
    grad_metric = m if m.name != "accuracy" else get_metric("loss")
    if algorithm == "eap" and not grad_metric.compares:
        return eap(model, data, metric=grad_metric)
    return eap_ig(model, data, metric=grad_metric, steps=ig_steps)


def _acdc_edges(data: EdgeData, m: Metric, threshold: float) -> Circuit:
    graph = data.graph
    fam = data.family
    mask = torch.zeros(len(graph), dtype=next(data.model.parameters()).dtype)
    states: list[list[tuple[int, list[Tensor], Tensor]]] = []
    scorers = []
    current_rows = []
    with torch.inference_mode():
        for item in data.items:
            key = ("clean states", id(item))
            if key not in data.cache:  # the clean run's streams, shared by every threshold
                st0: list[tuple[int, list[Tensor], Tensor]] = []
                fam.run(graph, item.tokens, item.mask, item.ablated, mask, states=st0)
                data.cache[key] = st0
            st = list(data.cache[key])
            logits = item.clean
            scorer = m.bind(item.batch, item.clean)
            states.append(st)
            scorers.append(scorer)
            current_rows.append(scorer(logits).double())
        n = sum(int(r.shape[0]) for r in current_rows)
        current = float(torch.cat(current_rows).sum()) / n
        scores: dict[str, float] = {}
        reads = fam.read_rows(graph)
        memo: dict = {}
        for e in graph.reverse_topological():
            layer = graph.dst_layer[e.dst_index]
            if _carries_nothing(data, states, e, layer, reads, memo):
                # The destination's input would not change (or only where it does not
                # read): the trial run is the current one, bit for bit.
                scores[e.name] = 0.0
                if threshold > 0.0:
                    mask[e.index] = 1
                continue
            mask[e.index] = 1
            trial_rows, trial_states = [], []
            for item, st, scorer in zip(data.items, states, scorers):
                new: list[tuple[int, list[Tensor], Tensor]] = []
                logits = fam.run(
                    graph,
                    item.tokens,
                    item.mask,
                    item.ablated,
                    mask,
                    start=st[layer],
                    states=new,
                ).logits
                trial_rows.append(scorer(logits).double())
                trial_states.append(new)
            trial = float(torch.cat(trial_rows).sum()) / n
            scores[e.name] = trial - current
            if trial - current < threshold:
                current = trial
                for st, new in zip(states, trial_states):
                    st[layer:] = new
            else:
                mask[e.index] = 0
    kept = [e.name for e in graph.edges if mask[e.index] == 0]
    return Circuit("acdc", graph.names, kept, scores, m.name, float("nan"), current, float("nan"))


def _carries_nothing(
    data: EdgeData, states: list, e: Any, layer: int, reads: Tensor | None, memo: dict
) -> bool:
    """Whether ablating ``e`` leaves its destination's input unchanged where it reads."""
    for item, st in zip(data.items, states):
        # the outputs after the destination's layer hold every source it reads (an MLP
        # reads its own layer's heads), all from the current circuit's run
        out = st[min(layer + 1, len(st) - 1)][1][e.src_index]
        key = (id(out), id(item), e.src_index)
        if key not in memo:  # which stream dimensions the ablation moves, per output
            moved = (item.ablated[e.src_index] != out).reshape(-1, out.shape[-1]).any(0)
            memo[key] = (out, moved)  # (out kept alive: its id stays unique)
        moved = memo[key][1]
        if reads is not None:
            moved = moved & reads[e.dst_index]
        if bool(moved.any()):
            return False
    return True


def _attribute_verify(
    data: EdgeData,
    m: Metric,
    ig_steps: int,
    verify_top: int | None,
    value: Any,
    m_full: float,
    m_empty: float,
    target: float,
) -> Circuit:
    """EAP ranks, the exact sweep verifies the top ``k``, the verified ranking is pruned;
    ``k`` grows until it reaches :data:`VERIFY_PAST` edges (or a quarter of the circuit,
    if more) past the circuit's lowest-ranked edge in EAP's order.

    What it guarantees: every kept edge's effect is measured exactly, the circuit's
    faithfulness is evaluated exactly, and it is the smallest top set of the verified
    ranking that the search shared with sweep-then-prune finds. It equals
    sweep-then-prune's circuit when the exact sweep's top edges, as far as that search
    looks, are all among the verified ones — then both rankings agree there and the
    same search gives the same answer. The margin makes that likely (an edge EAP
    underrates is caught while EAP ranks it within the margin below the circuit's
    lowest-ranked member) but only the full sweep could prove it; the benchmark
    (``benchmarks/bench_edges.py``) compares the two. The margin follows the circuit's
    reach in EAP's order rather than its size (the node version verifies twice the
    circuit, :data:`~meanablate.discovery.prune.VERIFY_MARGIN`): a circuit whose edges EAP
    ranks first needs few more, one reaching deep into EAP's ranking needs more.
    """
    names = data.graph.names
    n = len(names)
    attr = _rank(data, m, "eap", ig_steps)
    k = verify_top if verify_top is not None else max(1, math.ceil(VERIFY_START * n))
    if not 1 <= k <= n:
        raise ValueError(f"verify_top must lie in [1, {n}], got {k}")
    ranking = attr.ranking()
    place = {u: i for i, u in enumerate(ranking)}
    exact: dict[str, Scores] = {}
    while True:
        todo = [u for u in ranking[:k] if u not in exact]
        if todo:
            s = edge_sweep(data.model, data, edges=todo, metric=m)
            exact.update({u: s for u in todo})
        scores = _verified(names, attr, exact, m)
        scores.method = "attribute_verify"
        circuit = _prune_to_target(names, scores, value, m_full, m_empty, target)
        reach = max((place[u] + 1 for u in circuit.kept), default=0)
        need = reach + max(VERIFY_PAST, math.ceil(0.25 * len(circuit.kept)))
        if k >= need or k == n:
            return circuit
        # past what this circuit needs (it may grow as the ranking firms up), but at
        # most 4x a round: a circuit found on a poor early ranking can be far too big
        k = min(n, 4 * k, math.ceil(1.25 * need))
