"""Naive ablation loops, one hooked forward per unit, the way users write them: plain torch
hooks, TransformerLens 4 bridge ``run_with_hooks``, nnsight traces (``bench_families.py``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from meanablate.hooks import output_tensor, run_model

__all__ = ["bridge_loop", "nnsight_loop", "torch_hook_loop"]


def _kl_naive(logits: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits.double(), -1)
    return (lq.exp() * (lq - lp)).sum(-1).mean(-1)


def torch_hook_loop(
    model: nn.Module, module: nn.Module, batch: dict, is_input: bool, metric: str
) -> Callable[[list[int], torch.Tensor], None]:
    """One forward per neuron with a plain torch hook setting its column to the mean."""

    def loop(idx: list[int], mean: torch.Tensor) -> None:
        with torch.inference_mode():
            clean = output_tensor(run_model(model, batch))
            lq = torch.log_softmax(clean.double(), -1)
            for i in idx:
                if is_input:

                    def pre(_m: nn.Module, args: tuple, i: int = i) -> tuple:
                        a = args[0].clone()
                        a[..., i] = mean[i]
                        return (a, *args[1:])

                    handle = module.register_forward_pre_hook(pre)
                else:

                    def post(_m: nn.Module, _a: tuple, out: torch.Tensor, i: int = i) -> Any:
                        out = out.clone()
                        out[..., i] = mean[i]
                        return out

                    handle = module.register_forward_hook(post)
                try:
                    out = output_tensor(run_model(model, batch))
                finally:
                    handle.remove()
                if metric == "kl":
                    _kl_naive(out, lq)
                else:
                    (out - clean).pow(2).sum(-1).sqrt().mean(-1)

    return loop


def nnsight_loop(
    model: nn.Module, path: list[str | int], batch: dict, is_input: bool, metric: str
) -> Callable[[list[int], torch.Tensor], None] | None:
    """One nnsight trace per neuron, setting its column to the mean."""
    try:
        from nnsight import NNsight
    except ImportError:
        return None
    # nnsight sets instance-level forwards on the modules it wraps: give it a copy, so the
    # model the other measurements use stays as it was
    wrapped = NNsight(copy.deepcopy(model))
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "tokens")}

    def loop(idx: list[int], mean: torch.Tensor) -> None:
        with torch.no_grad():
            clean = output_tensor(run_model(wrapped._module, batch))
            lq = torch.log_softmax(clean.double(), -1)
            for i in idx:
                with wrapped.trace(**inputs):
                    node: Any = wrapped
                    for p in path:
                        node = node[p] if isinstance(p, int) else getattr(node, p)
                    act = node.input if is_input else node.output
                    act[..., i] = mean[i]
                    saved = wrapped.output.save()
                out = output_tensor(saved)
                if metric == "kl":
                    _kl_naive(out, lq)
                else:
                    (out - clean).pow(2).sum(-1).sqrt().mean(-1)

    return loop


def bridge_loop(
    bridge: Any, hook_name: str, tokens: torch.Tensor
) -> Callable[[list[int], torch.Tensor], None]:
    """One ``run_with_hooks`` per neuron on a TransformerLens 4 bridge."""

    def loop(idx: list[int], mean: torch.Tensor) -> None:
        with torch.inference_mode():
            lq = torch.log_softmax(bridge(tokens).double(), -1)
            for i in idx:

                def hook(act: torch.Tensor, hook: Any, i: int = i) -> torch.Tensor:
                    act = act.clone()
                    act[..., i] = mean[i]
                    return act

                _kl_naive(bridge.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)]), lq)

    return loop
