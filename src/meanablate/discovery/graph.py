"""The computational graph of a transformer: nodes, and edges between them.

Nodes are the embeddings (token + position, one ``input`` node), every attention head,
every MLP, and the logits. An edge ``src -> dst`` is ``src``'s write into the residual
stream as ``dst``'s input reads it; with ``split_qkv`` a head has three inputs (its query,
key and value), as in ACDC (Conmy et al. 2023), auto-circuit and EAP-IG. Ablating an edge
changes only what ``dst`` reads (``dst``'s input becomes ``resid - out_src + ablated_src``,
auto-circuit's difference form); every other reader of ``src`` sees the clean value.

Names follow the EAP-IG / MIB circuit files so that circuits export without renaming:
``input``, ``a{layer}.h{head}``, ``m{layer}``, ``logits``; an edge is ``"m0->a1.h0<q>"``
(a head input with its q/k/v letter) or ``"a0.h1->logits"``.

This module is pure structure (no tensors, no models beyond reading the shape): the
forward that honours edge masks lives in :mod:`meanablate.discovery.edge_forward`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Edge", "Graph", "Node", "build_graph", "node_unit"]

NodeKind = Literal["input", "head", "mlp", "logits"]
_EDGE_RE = re.compile(r"^(?P<src>[^<>\s-]+)->(?P<dst>[^<>\s-]+)(?:<(?P<qkv>[qkv])>)?$")


@dataclass(frozen=True)
class Node:
    """A component: ``kind``, its ``layer`` (input: -1, logits: n_layers) and ``head``."""

    name: str
    kind: NodeKind
    layer: int
    head: int | None = None


@dataclass(frozen=True)
class Edge:
    """``src``'s write as read by ``dst`` (``qkv``: which input of a head, or ``None``).

    ``index``: the edge's position in :attr:`Graph.edges`; ``src_index`` / ``dst_index``:
    positions in :attr:`Graph.srcs` / :attr:`Graph.dsts`.
    """

    name: str
    src: str
    dst: str
    qkv: str | None
    index: int
    src_index: int
    dst_index: int

    @property
    def dst_full(self) -> str:
        """The destination input's name (``a1.h0<q>``, ``m1``, ``logits``)."""
        return f"{self.dst}<{self.qkv}>" if self.qkv else self.dst


@dataclass
class Graph:
    """Sources (nodes that write), destinations (inputs that read) and the edges.

    ``srcs``: in forward order (input, then per layer the heads and the MLP).
    ``dsts``: destination inputs in forward order, named like edges' right-hand sides
    (``a1.h0<q>``, ``m1``, ``logits``); ``dst_layer[i]`` is the block that reads it
    (``n_layers`` for the logits). Edges are ordered by destination, then source.
    """

    n_layers: int
    n_heads: int
    has_mlp: bool
    split_qkv: bool
    srcs: list[Node]
    dsts: list[str]
    dst_layer: list[int]
    edges: list[Edge]
    _by_name: dict[str, Edge] = field(default_factory=dict, repr=False)
    parallel: bool = False
    unit_names: dict[str, str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {e.name: e for e in self.edges}

    def __len__(self) -> int:
        return len(self.edges)

    @property
    def names(self) -> list[str]:
        """Edge names in graph order."""
        return [e.name for e in self.edges]

    def edge(self, name: str) -> Edge:
        """The edge called ``name``; a clear error if the graph has no such edge."""
        if name in self._by_name:
            return self._by_name[name]
        m = _EDGE_RE.match(name) if isinstance(name, str) else None
        if m is None:
            raise ValueError(
                f"edge {name!r} is not an edge name; edges read 'src->dst' with src one of "
                "input, a{L}.h{H}, m{L} and dst one of a{L}.h{H}<q|k|v>, m{L}, logits "
                "(e.g. 'a0.h1->a1.h0<k>')"
            )
        src = m.group("src")
        dsts = sorted({e.dst_full for e in self.edges_from(src)}) if self.has_src(src) else []
        hint = (
            f"; {src} feeds {', '.join(dsts[:8])}{' ...' if len(dsts) > 8 else ''}" if dsts else ""
        )
        raise ValueError(
            f"edge {name!r} does not exist in this graph ({self.n_layers} layers, "
            f"{self.n_heads} heads, split_qkv={self.split_qkv}){hint}"
        )

    def indices(self, names: Iterable[str]) -> list[int]:
        """Positions of the named edges (each checked)."""
        if isinstance(names, str):
            raise TypeError(f"expected a list of edge names, got the string {names!r}")
        return [self.edge(n).index for n in names]

    def unit(self, node: str) -> str | None:
        """The site string of ``node`` as a node-level unit of this graph's model
        (``None`` for ``input`` and ``logits``)."""
        if self.unit_names and node in self.unit_names:
            return self.unit_names[node]
        return node_unit(node)

    def has_src(self, name: str) -> bool:
        return any(n.name == name for n in self.srcs)

    def edges_from(self, src: str) -> list[Edge]:
        return [e for e in self.edges if e.src == src]

    def edges_into(self, dst: str) -> list[Edge]:
        """Edges into a destination input (``a1.h0<q>``) or into a whole node (``a1.h0``)."""
        return [e for e in self.edges if e.dst_full == dst or e.dst == dst]

    def src_index(self, name: str) -> int:
        for i, n in enumerate(self.srcs):
            if n.name == name:
                return i
        raise ValueError(
            f"node {name!r} is not a source node; sources: {', '.join(n.name for n in self.srcs)}"
        )

    def between(self, kept_nodes: Iterable[str]) -> list[str]:
        """Edges whose source and destination node are both in ``kept_nodes`` (``input``
        and ``logits`` are always kept): the edge circuit of a node circuit."""
        kept = set(kept_nodes) | {"input", "logits"}
        return [e.name for e in self.edges if e.src in kept and e.dst in kept]

    def reverse_topological(self) -> list[Edge]:
        """Edges for ACDC: destinations from the logits backwards; within one destination,
        the latest source first (Conmy et al. 2023, reverse topological order)."""
        return sorted(self.edges, key=lambda e: (-e.dst_index, -e.src_index))


def node_unit(node: str) -> str | None:
    """The site string of a node as a node-level unit (``a1.h0`` ->
    ``blocks.1.attn.hook_z[heads=0]``, ``m2`` -> ``blocks.2.hook_mlp_out``); ``None`` for
    ``input`` and ``logits``."""
    m = re.match(r"^a(\d+)\.h(\d+)$", node)
    if m:
        return f"blocks.{m.group(1)}.attn.hook_z[heads={m.group(2)}]"
    m = re.match(r"^m(\d+)$", node)
    if m:
        return f"blocks.{m.group(1)}.hook_mlp_out"
    if node in ("input", "logits"):
        return None
    raise ValueError(f"unknown node {node!r}")


def unit_node(unit: str) -> str:
    """Inverse of :func:`node_unit` for head and MLP units."""
    m = re.match(r"^blocks\.(\d+)\.attn\.hook_z\[heads=(\d+)\]$", unit)
    if m:
        return f"a{m.group(1)}.h{m.group(2)}"
    m = re.match(r"^blocks\.(\d+)\.hook_mlp_out$", unit)
    if m:
        return f"m{m.group(1)}"
    raise ValueError(
        f"unit {unit!r} is not a graph node; nodes are blocks.L.attn.hook_z[heads=H] "
        "and blocks.L.hook_mlp_out"
    )


def build_graph(
    n_layers: int,
    n_heads: int,
    has_mlp: bool,
    *,
    split_qkv: bool = True,
    parallel: bool = False,
) -> Graph:
    """The graph of a decoder with ``n_layers`` blocks of ``n_heads`` heads (+ an MLP).

    ``parallel``: attention and MLP of a block both read the block's input (GPT-NeoX /
    Pythia with ``use_parallel_residual``): no edges from a layer's heads into its MLP.

    >>> g = build_graph(2, 1, True)
    >>> len(g), g.names[0], g.names[-1]
    (23, 'input->a0.h0<q>', 'm1->logits')
    >>> len(build_graph(2, 1, True, parallel=True))
    21
    """
    if n_layers < 1 or n_heads < 1:
        raise ValueError(f"a graph needs n_layers >= 1 and n_heads >= 1, got {n_layers}, {n_heads}")
    srcs: list[Node] = [Node("input", "input", -1)]
    dsts: list[str] = []
    dst_layer: list[int] = []
    edges: list[Edge] = []

    def add_dst(
        name: str, node: str, qkv: str | None, layer: int, n_src: int | None = None
    ) -> None:
        di = len(dsts)
        dsts.append(name)
        dst_layer.append(layer)
        for si, s in enumerate(srcs[:n_src]):
            tag = f"<{qkv}>" if qkv else ""
            edges.append(Edge(f"{s.name}->{node}{tag}", s.name, node, qkv, len(edges), si, di))

    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        for h in heads:
            for qkv in ("q", "k", "v") if split_qkv else (None,):
                add_dst(f"{h}<{qkv}>" if qkv else h, h, qkv, layer)
        before = len(srcs)
        srcs.extend(Node(h, "head", layer, i) for i, h in enumerate(heads))
        if has_mlp:
            add_dst(f"m{layer}", f"m{layer}", None, layer, before if parallel else None)
            srcs.append(Node(f"m{layer}", "mlp", layer))
    add_dst("logits", "logits", None, n_layers)
    return Graph(
        n_layers, n_heads, has_mlp, split_qkv, srcs, dsts, dst_layer, edges, parallel=parallel
    )


def graph_of(model: object, *, split_qkv: bool = True) -> Graph:
    """The graph of a model whose family the edge layer knows (see ``edge_forward``)."""
    from meanablate.discovery.edge_forward import edge_family

    return edge_family(model).graph(split_qkv=split_qkv)


def check_edge_names(graph: Graph, names: Sequence[str]) -> list[int]:
    """Indices of ``names`` in ``graph``; duplicates are an error."""
    idx = graph.indices(names)
    if len(set(idx)) != len(idx):
        raise ValueError("edges contain duplicates")
    return idx
