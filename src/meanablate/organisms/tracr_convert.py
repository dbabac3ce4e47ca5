"""tracr -> :class:`~meanablate.organisms.transformer.HookedTransformer`: compile a RASP
program step by step (keeping the graph, to say which unit implements which operation)
and copy the weights. tracr (and jax) are imported here only, lazily.

Conversion: tracr's ``layer_k/attn`` then ``layer_k/mlp`` make our block ``k``;
query/key/value ``[d_model, head * key_size]`` become ``W_Q/W_K/W_V [head, d_model,
d_head]`` with ``d_head = key_size`` (tracr zero-pads value sizes and missing heads to
this itself; we keep the padding); ``linear`` becomes ``W_O [head, d_head, d_model]``;
``mlp/linear_1``/``linear_2`` become ``W_in``/``W_out``; all biases are copied (tracr's
are zero). ``W_E`` is tracr's token embedding (rows = tracr's input-encoder ids), ``W_pos``
tracr's position embedding, and ``W_U`` the one-hot projection of the residual stream onto
the output space (one column per output class, or the single numerical output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from meanablate.organisms.transformer import HookedTransformer, TransformerConfig

__all__ = ["Compiled", "compile_program", "program_components", "to_hooked_transformer"]


@dataclass
class Compiled:
    """A compiled program: tracr's assembled model, the annotated graph and its sink."""

    program: Any
    assembled: Any  # tracr AssembledTransformerModel
    graph: Any
    sink: Any
    craft_model: Any
    module_names: list[str]  # tracr module ("transformer/layer_k/attn") of each craft block

    @property
    def categorical(self) -> bool:
        from tracr.compiler import nodes
        from tracr.rasp import rasp

        return bool(rasp.is_categorical(self.sink[nodes.EXPR]))

    @property
    def output_labels(self) -> list[str]:
        """Residual labels of the output space, in tracr's output-class order."""
        from tracr.compiler import nodes

        return [str(d) for d in self.sink[nodes.OUTPUT_BASIS]]

    @property
    def output_values(self) -> list[Any]:
        """The output classes' values (categorical), in class-id order."""
        enc = self.assembled.output_encoder.encoding_map
        return [v for v, _ in sorted(enc.items(), key=lambda kv: kv[1])]


def compile_program(
    program: Any,
    vocab: set[Any],
    max_seq_len: int,
    *,
    causal: bool,
    compiler_bos: str,
    compiler_pad: str,
    mlp_exactness: int,
) -> Compiled:
    """``compiling.compile_rasp_to_model``, step by step, keeping the graph for the card."""
    from tracr.compiler import (
        assemble,
        basis_inference,
        craft_graph_to_model,
        craft_model_to_transformer,
        expr_to_craft_graph,
        rasp_to_graph,
        validating,
    )
    from tracr.craft import bases
    from tracr.rasp import rasp

    if not isinstance(program, rasp.SOp):
        raise TypeError(f"program must be a tracr RASP SOp, got {type(program).__name__}")
    problems = validating.static_validate(program)
    if problems:
        raise ValueError(
            "tracr cannot compile this program exactly: "
            + "; ".join(f"{p.expr.label}: {p.reason}" for p in problems[:3])
        )
    extracted = rasp_to_graph.extract_rasp_graph(program)
    graph, sources, sink = extracted.graph, extracted.sources, extracted.sink
    basis_inference.infer_bases(graph, sink, set(vocab), max_seq_len)
    expr_to_craft_graph.add_craft_components_to_rasp_graph(
        graph,
        bos_dir=bases.BasisDirection(rasp.tokens.label, compiler_bos),
        mlp_exactness=mlp_exactness,
    )
    craft_model = craft_graph_to_model.craft_graph_to_model(graph, sources)
    assembled = craft_model_to_transformer.craft_model_to_transformer(
        craft_model=craft_model,
        graph=graph,
        sink=sink,
        max_seq_len=max_seq_len,
        causal=causal,
        compiler_bos=compiler_bos,
        compiler_pad=compiler_pad,
    )
    _, module_names = assemble._get_model_config_and_module_names(craft_model)
    return Compiled(program, assembled, graph, sink, craft_model, module_names)


def _np(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def to_hooked_transformer(compiled: Compiled) -> HookedTransformer:
    """Copy tracr's weights into our :class:`HookedTransformer` (eval mode)."""
    am = compiled.assembled
    mc = am.model_config
    params = am.params
    w_e = _np(params["token_embed"]["embeddings"])
    w_pos = _np(params["pos_embed"]["embeddings"])
    d_model = w_e.shape[1]
    h, dh = mc.num_heads, mc.key_size
    labels = list(am.residual_labels)
    out = compiled.output_labels
    cfg = TransformerConfig(
        n_layers=mc.num_layers,
        d_model=d_model,
        n_heads=h,
        d_head=dh,
        d_vocab=w_e.shape[0],
        n_ctx=w_pos.shape[0],
        d_mlp=mc.mlp_hidden_size,
        d_vocab_out=len(out),
        act_fn="relu",
        normalization=None,
        causal=bool(mc.causal),
    )
    sd: dict[str, np.ndarray] = {"W_E": w_e, "W_pos": w_pos}
    for layer in range(mc.num_layers):
        attn = f"transformer/layer_{layer}/attn"
        mlp = f"transformer/layer_{layer}/mlp"
        pre = f"blocks.{layer}"
        for ours, theirs in (("Q", "query"), ("K", "key"), ("V", "value")):
            w = _np(params[f"{attn}/{theirs}"]["w"]).reshape(d_model, h, dh)
            sd[f"{pre}.attn.W_{ours}"] = w.transpose(1, 0, 2)
            sd[f"{pre}.attn.b_{ours}"] = _np(params[f"{attn}/{theirs}"]["b"]).reshape(h, dh)
        sd[f"{pre}.attn.W_O"] = _np(params[f"{attn}/linear"]["w"]).reshape(h, dh, d_model)
        sd[f"{pre}.attn.b_O"] = _np(params[f"{attn}/linear"]["b"])
        sd[f"{pre}.mlp.W_in"] = _np(params[f"{mlp}/linear_1"]["w"])
        sd[f"{pre}.mlp.b_in"] = _np(params[f"{mlp}/linear_1"]["b"])
        sd[f"{pre}.mlp.W_out"] = _np(params[f"{mlp}/linear_2"]["w"])
        sd[f"{pre}.mlp.b_out"] = _np(params[f"{mlp}/linear_2"]["b"])
    w_u = np.zeros((d_model, len(out)), dtype=np.float32)
    for cls, label in enumerate(out):
        w_u[labels.index(label), cls] = 1.0
    sd["W_U"] = w_u
    sd["b_U"] = np.zeros(len(out), dtype=np.float32)
    model = HookedTransformer(cfg)
    mismatch = set(model.state_dict()) ^ set(sd)
    if mismatch:  # a tracr layout we do not know
        raise ValueError(f"tracr's parameters do not map onto ours: {sorted(mismatch)[:5]}")
    model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()})
    return model.eval()


# -- which unit implements which RASP operation ----------------------------------------
def _describe(expr: Any) -> str:
    from tracr.rasp import rasp

    def sel(s: Any) -> str:
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


def _layer(module_name: str) -> int:
    return int(module_name.split("/")[1].removeprefix("layer_"))


def program_components(compiled: Compiled) -> list[dict[str, Any]]:
    """Per unit that implements part of the program: the RASP operations it carries."""
    from tracr.compiler import nodes
    from tracr.craft import transformers

    located: dict[str, dict[str, Any]] = {}
    blocks = list(zip(compiled.craft_model.blocks, compiled.module_names, strict=True))

    def find_head(head: Any) -> str:
        for block, name in blocks:
            if "attn" in name:
                for i, other in enumerate(block.as_multi().heads()):
                    if other is head:
                        return f"blocks.{_layer(name)}.attn.hook_z[heads={i}]"
        raise LookupError("head not found in the craft model")

    def find_mlp(mlp: Any) -> str:
        hidden = list(mlp.fst.output_space.basis)
        for block, name in blocks:
            if "mlp" in name and all(d in list(block.fst.output_space.basis) for d in hidden):
                return f"blocks.{_layer(name)}.hook_mlp_out"
        raise LookupError("MLP not found in the craft model")

    for _, node in compiled.graph.nodes.items():
        block = node.get(nodes.MODEL_BLOCK)
        if block is None:
            continue
        expr = node[nodes.EXPR]
        parts = block.blocks if isinstance(block, transformers.SeriesWithResiduals) else [block]
        for part in parts:
            if isinstance(part, transformers.MLP):
                units, role = [find_mlp(part)], "MLP"
            else:
                units, role = [find_head(h) for h in part.as_multi().heads()], "attention"
            for unit in units:
                entry = located.setdefault(unit, {"unit": unit, "rasp": []})
                entry["rasp"].append({"op": _describe(expr), "part": role})

    def key(u: str) -> tuple[int, int, int]:
        layer = int(u.split(".")[1])
        if u.endswith("hook_mlp_out"):
            return (layer, 1, 0)
        return (layer, 0, int(u.split("heads=")[1].rstrip("]")))

    return [located[u] for u in sorted(located, key=key)]
