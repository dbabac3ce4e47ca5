"""Attaching to torch modules: hooks that live only inside a ``with`` block.

Every hook registered here is removed in a ``finally`` clause, so an exception (or a
Ctrl-C) inside the block never leaves a model with hooks attached; registration and
removal themselves are atomic with respect to ``KeyboardInterrupt`` (:func:`attached`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from meanablate._unwrap import unwrap
from meanablate.sites import resolve_module

__all__ = ["TASK_KEYS", "attached", "capture", "hooked", "output_tensor", "run_model"]

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


HookKind = Literal["forward", "forward_pre", "forward_pre_kwargs"]


@contextmanager
def attached(hooks: Sequence[tuple[nn.Module, HookKind, Callable[..., Any]]]) -> Iterator[None]:
    """Register ``(module, kind, fn)`` hooks for the block; none is left after it.

    Atomic with respect to ``KeyboardInterrupt``: an interrupt landing between (or inside)
    any two registrations or removals leaves no hook. The hooks are known before the
    first one goes in, and removal finds each by identity in the module's hook dicts —
    not through a handle that an interrupt could separate from its hook — and keeps
    going when interrupted, re-raising afterwards.
    """
    planned = list(hooks)
    # Two full removal passes, the outer one entered before the first registration: an
    # interrupt that lands on the first pass's own line (before it can catch anything)
    # still meets the second. Each pass finishes even when interrupted inside.
    try:
        try:
            for module, kind, fn in planned:
                if kind == "forward_pre":
                    module.register_forward_pre_hook(fn)
                elif kind == "forward_pre_kwargs":  # fn(module, args, kwargs)
                    module.register_forward_pre_hook(fn, with_kwargs=True)
                else:
                    module.register_forward_hook(fn)
            yield
        finally:
            _detach_all(planned)
    finally:
        _detach_all(planned)  # a no-op unless the first pass was cut short


def _detach_all(planned: Sequence[tuple[nn.Module, HookKind, Callable[..., Any]]]) -> None:
    pending = list(planned)
    interrupted: BaseException | None = None
    while pending:
        try:
            module, _kind, fn = pending[-1]
            _detach(module, fn)
            pending.pop()
        except BaseException as exc:  # Ctrl-C mid-removal: finish removing, then re-raise
            interrupted = exc
    if interrupted is not None:
        raise interrupted


def _detach(module: nn.Module, fn: Callable[..., Any]) -> None:
    """Remove every registration of ``fn`` on ``module`` (forward and pre hooks)."""
    for hooks, extras in (
        (
            module._forward_hooks,
            (module._forward_hooks_with_kwargs, module._forward_hooks_always_called),
        ),
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
    ):
        for hook_id in [k for k, v in hooks.items() if v is fn]:
            for extra in extras:
                extra.pop(hook_id, None)
            hooks.pop(hook_id, None)


def _framework_view(
    model: nn.Module, path: str, module: nn.Module, fn: ActivationFn
) -> ActivationFn:
    """``fn`` as it must run on ``module`` to see what the model's own framework shows.

    A TransformerLens-4 ``HookPoint`` passes a raw tensor through its torch hooks (a
    bridge's ``blocks.L.attn.hook_z`` is the flat ``[batch, pos, n_heads * d_head]``
    input of the output projection) and converts it only for TL hook functions:
    ``HookPoint.add_hook`` calls ``hook_conversion.convert`` before the function and
    ``revert`` on what it returns. We do the same, so ``fn`` sees TL's shapes
    (``[batch, pos, head, d_head]``) and its replacement takes effect as in
    ``run_with_hooks``. A hook point the bridge never fires (gated off by its config)
    is refused instead of silently doing nothing. Other modules: ``fn`` unchanged.
    """
    hook_points = sys.modules.get("transformer_lens.hook_points")  # loaded if a bridge exists
    if hook_points is None or not isinstance(module, hook_points.HookPoint):
        return fn
    gated = getattr(model, "_gated_hook_reason", None)
    reason = gated(module.name or path) if callable(gated) else None
    if reason is not None:
        raise ValueError(
            f"site {path}: this TransformerLens hook point never fires because "
            f"cfg.{reason} is False; call model.set_{reason}(True) first"
        )

    def tl_fn(act: Tensor) -> Tensor | None:
        conv = module.hook_conversion  # read per call, as HookPoint.add_hook's hook does
        if conv is None:
            return fn(act)
        states = getattr(conv, "_conversion_state", None)
        fresh = isinstance(states, dict) and id(act) not in states
        try:
            new = fn(conv.convert(act))
            return None if new is None else conv.revert(new)
        finally:
            if fresh:  # AttentionAutoConversion keys state by tensor id: drop ours
                states.pop(id(act), None)  # type: ignore[union-attr]

    return tl_fn


@contextmanager
def hooked(model: nn.Module, hooks: Mapping[str, ActivationFn]) -> Iterator[None]:
    """Run ``fn`` on the activation at each site key while inside the block.

    ``hooks`` maps a site key (``"blocks.0.attn.hook_z"`` for a module's output,
    ``"transformer.h.0.attn.c_proj@input"`` for its first positional input) to a
    function of the activation that returns its replacement, or ``None`` to keep it.
    Every module is resolved and every hook built before the first one goes in; see
    :func:`attached` for why an interrupt can leave none behind.
    """
    model = unwrap(model)
    planned: list[tuple[nn.Module, HookKind, Callable[..., Any]]] = []
    for key, fn in hooks.items():
        path, is_input = _split_key(key)
        module = resolve_module(model, path)
        fn = _framework_view(model, path, module, fn)
        if is_input:

            def pre_hook(
                _m: nn.Module, args: tuple, _fn: ActivationFn = fn, _key: str = key
            ) -> tuple:
                if not args:
                    raise TypeError(
                        f"site {_key}: the module was called with keyword arguments only, "
                        "so it has no positional input to read; hook the output of the "
                        "module before it instead"
                    )
                return (_replace_first(args[0], _fn), *args[1:])

            planned.append((module, "forward_pre", pre_hook))
        else:

            def post_hook(_m: nn.Module, _a: tuple, out: Any, _fn: ActivationFn = fn) -> Any:
                return _replace_first(out, _fn)

            planned.append((module, "forward", post_hook))
    with attached(planned):
        yield


@contextmanager
def capture(
    model: nn.Module, keys: list[str], *, detach: bool = True, once: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Record the activations at ``keys`` during forward passes inside the block.

    Yields a dict filled as the model runs (the last forward's activation per key); the
    hooks leave when the block ends. With ``detach`` (the default) each activation is
    copied when it is seen: a model that later adds into it in place (Falcon's
    ``mlp_output += attention_output``) would otherwise change what was recorded.
    ``once``: a site that runs more than once in one forward of ``model`` (a module
    shared between layers, as in ALBERT, or called per chunk) is a ``ValueError``
    instead of keeping its last call — for callers that need the one activation of a
    forward (a resample source, a cached clean run).

    >>> import torch, meanablate as ma
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    >>> with ma.capture(model, ["0"]) as acts:
    ...     _ = model(torch.ones(2, 5, 3))                       # [batch, pos, d_in]
    >>> acts["0"].shape                                           # [batch, pos, d_out]
    torch.Size([2, 5, 4])
    """
    store: dict[str, Tensor] = {}
    seen: set[str] = set()  # keys recorded in the current forward of ``model``

    def recorder(key: str) -> ActivationFn:
        def record(act: Tensor) -> None:
            if once:
                if key in seen:
                    raise ValueError(
                        f"site {key} ran more than once in one forward pass (a module "
                        "shared between layers, or called per chunk), so it has no single "
                        "activation per forward to resample from; use a site that runs "
                        "once per forward (e.g. a module inside one layer), or "
                        "method='mean'/'zero' (which replace every call)"
                    )
                seen.add(key)
            store[key] = act.detach().clone() if detach else act
            return None

        return record

    def new_forward(_m: nn.Module, _args: tuple) -> None:
        seen.clear()

    starts = [(unwrap(model), "forward_pre", new_forward)] if once else []
    with attached(starts), hooked(model, {k: recorder(k) for k in keys}):  # type: ignore[arg-type]
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

    >>> import torch, meanablate as ma
    >>> model = torch.nn.Linear(3, 2)
    >>> ma.run_model(model, torch.ones(4, 3)).shape
    torch.Size([4, 2])
    """
    model = unwrap(model)
    if isinstance(batch, Tensor):
        _check_ids(model, "batch", batch)
        return model(batch)
    if not isinstance(batch, Mapping):
        raise TypeError(f"a batch is a tensor or a dict of tensors, got {type(batch).__name__}")
    ids = None
    for name in ("input_ids", "tokens"):
        if isinstance(batch.get(name), Tensor):
            ids = batch[name]
            _check_ids(model, f"batch[{name!r}]", ids, named=True)
    _check_mask(batch.get("attention_mask"), ids)
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


def _vocab_size(model: nn.Module) -> int | None:
    """The number of token ids the model embeds (``None``: not known)."""
    get = getattr(model, "get_input_embeddings", None)  # Hugging Face
    try:
        emb = get() if callable(get) else None
    except Exception:  # some HF classes raise NotImplementedError here
        emb = None
    if isinstance(emb, nn.Embedding):
        return int(emb.num_embeddings)
    cfg = getattr(model, "cfg", None)  # ours, TransformerLens
    vocab = getattr(cfg, "d_vocab", None)
    ok = isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0  # TL: -1 = unset
    return vocab if ok else None


def _check_ids(model: nn.Module, what: str, ids: Tensor, *, named: bool = False) -> None:
    """Token ids checked before the forward: an empty batch, float ids, or an id outside
    the embedding would otherwise fail deep inside the model (or not at all)."""
    if ids.ndim and ids.shape[0] == 0:
        raise ValueError(f"{what} has shape {tuple(ids.shape)}: a batch needs at least one example")
    if ids.is_floating_point() or ids.is_complex():
        if named:
            raise TypeError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
        return  # a float tensor batch is a model input of its own (features, images)
    if ids.dtype == torch.bool or ids.numel() == 0:
        return
    vocab = _vocab_size(model)
    if vocab is None:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"{what} holds token ids in [{lo}, {hi}], but the model embeds ids 0..{vocab - 1} "
            f"(a vocabulary of {vocab}); check the tokenizer matches the model"
        )


def _check_mask(mask: Any, ids: Tensor | None) -> None:
    """A ``[batch, pos]`` attention mask: the ids' shape, 0 (padding) and 1 only. (A 4-d
    mask is the model's own business.)"""
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        return
    if ids is not None and ids.ndim == 2 and tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"batch['attention_mask'] has shape {tuple(mask.shape)}, but the token ids are "
            f"{tuple(ids.shape)}; it needs one entry per token"
        )
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        values = sorted({float(v) for v in mask.unique()[:6].tolist()})
        raise ValueError(
            f"batch: attention_mask must hold only 0 (padding) and 1 (a real token), "
            f"got values {values}"
        )


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
