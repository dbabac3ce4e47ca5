"""Attaching to torch modules: hooks that live only inside a ``with`` block.

Every hook registered here is removed in a ``finally`` clause, so an exception (or a
Ctrl-C) inside the block never leaves a model with hooks attached.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from meanablate.sites import resolve_module

__all__ = ["TASK_KEYS", "capture", "hooked", "output_tensor", "run_model"]

# Batch fields that describe the task, never passed to the model.
TASK_KEYS = frozenset(
    {"target", "target_value", "wrong", "labels", "target_pos", "metric_mask"}
    | {"corrupt", "corrupt_attention_mask"}  # a counterfactual input rides along, unused
)

# fn(activation) -> new activation (or None to leave it)
ActivationFn = Callable[[Tensor], Tensor | None]


def _split_key(key: str) -> tuple[str, bool]:
    if key.endswith("@input"):
        return key[: -len("@input")], True
    return key, False


def _replace_first(value: Any, fn: ActivationFn) -> Any:
    # HF modules often return tuples (hidden, attn_weights, ...): the activation is first.
    if isinstance(value, Tensor):
        new = fn(value)
        return value if new is None else new
    if isinstance(value, tuple) and value and isinstance(value[0], Tensor):
        new = fn(value[0])
        return value if new is None else (new, *value[1:])
    raise TypeError(
        f"cannot hook a module whose activation is {type(value).__name__}; "
        "expected a tensor or a tuple starting with one"
    )


@contextmanager
def hooked(model: nn.Module, hooks: Mapping[str, ActivationFn]) -> Iterator[None]:
    """Run ``fn`` on the activation at each site key while inside the block.

    ``hooks`` maps a site key (``"blocks.0.attn.hook_z"`` for a module's output,
    ``"transformer.h.0.attn.c_proj@input"`` for its first positional input) to a
    function of the activation that returns its replacement, or ``None`` to keep it.
    """
    handles = []
    try:
        for key, fn in hooks.items():
            path, is_input = _split_key(key)
            module = resolve_module(model, path)
            if is_input:

                def pre_hook(_m: nn.Module, args: tuple, _fn: ActivationFn = fn) -> tuple:
                    if not args:
                        raise TypeError("input hooks need the activation as a positional arg")
                    return (_replace_first(args[0], _fn), *args[1:])

                handles.append(module.register_forward_pre_hook(pre_hook))
            else:

                def post_hook(_m: nn.Module, _a: tuple, out: Any, _fn: ActivationFn = fn) -> Any:
                    return _replace_first(out, _fn)

                handles.append(module.register_forward_hook(post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(
    model: nn.Module, keys: list[str], *, detach: bool = True
) -> Iterator[dict[str, Tensor]]:
    """Record the activations at ``keys`` during forward passes inside the block.

    Yields a dict filled as the model runs (the last forward's activation per key).
    """
    store: dict[str, Tensor] = {}

    def recorder(key: str) -> ActivationFn:
        def record(act: Tensor) -> None:
            store[key] = act.detach() if detach else act
            return None

        return record

    with hooked(model, {k: recorder(k) for k in keys}):
        yield store


def _accepted_kwargs(model: nn.Module) -> tuple[set[str], bool]:
    params = inspect.signature(model.forward).parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return set(params), has_var_kw


def run_model(model: nn.Module, batch: Tensor | Mapping[str, Any]) -> Any:
    """Call ``model`` on a batch: a tensor positionally, a dict as keyword arguments.

    Dict batches lose their task fields (``target``, ``wrong``, ...) and any key the
    model's ``forward`` does not accept. Our organisms take ``tokens``; HF models take
    ``input_ids``: each gets its own name.
    """
    if isinstance(batch, Tensor):
        return model(batch)
    if not isinstance(batch, Mapping):
        raise TypeError(f"a batch is a tensor or a dict of tensors, got {type(batch).__name__}")
    accepted, var_kw = _accepted_kwargs(model)
    items = {k: v for k, v in batch.items() if k not in TASK_KEYS}
    # Token ids go by the name the forward declares (renamed before filtering, so that a
    # name the forward lacks is not dropped first): ``tokens``, ``input_ids``, or
    # ``input`` (TransformerLens's TransformerBridge.forward).
    for name in ("tokens", "input_ids"):
        if name in items and name not in accepted:
            to = next((t for t in ("input_ids", "tokens", "input") if t in accepted), None)
            if to is None and name == "tokens" and var_kw:
                to = "input_ids"
            if to is not None and to not in items:
                items[to] = items.pop(name)
    kwargs = {k: v for k, v in items.items() if k in accepted or var_kw}
    if not kwargs:
        raise ValueError(
            f"none of the batch's keys {sorted(batch)} is an input of "
            f"{type(model).__name__}.forward (accepts {sorted(accepted)})"
        )
    return model(**kwargs)


def output_tensor(out: Any) -> Tensor:
    """The tensor a metric reads from a model's output: logits where there are logits."""
    if isinstance(out, Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


def batch_size_of(batch: Tensor | Mapping[str, Any]) -> int:
    """Number of examples in a batch (first dim of its first tensor)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    for value in batch.values():
        if isinstance(value, Tensor) and value.ndim:
            return int(value.shape[0])
    raise ValueError("batch holds no tensors")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a tensor or every tensor of a dict batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
