"""Hook registration and removal are atomic with respect to KeyboardInterrupt: an interrupt
injected at every line executed while hooks go in or come out (``sys.settrace``) — inside
our code and inside torch's registration and removal code — leaves no hook on the model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import meanablate as ma
import meanablate.hooks as hooks_mod

torch.set_num_threads(1)
TRACED = (
    str(Path(hooks_mod.__file__).resolve()),
    str(Path(nn.modules.module.__file__).resolve()),
    str(Path(torch.utils.hooks.__file__).resolve()),
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks
        and not m._forward_pre_hooks
        and not m._forward_hooks_with_kwargs
        and not m._forward_hooks_always_called
        and not m._forward_pre_hooks_with_kwargs
        for m in model.modules()
    )


def _run(model: nn.Module, body: str) -> None:
    x = torch.ones(2, 3)
    sites = {"0": None, "1@input": None, "2": None, "3@input": None, "4": None}
    fns = {k: (lambda a: a) for k in sites}
    if body == "hooked":
        with hooks_mod.hooked(model, fns):
            model(x)
    elif body == "capture":
        with ma.capture(model, list(sites)):
            model(x)
    else:  # ablate: the public context manager, zero ablation of two sites
        with ma.ablate(model, ["0[neurons=1]", "2[neurons=0]", "3[neurons=2]"], method="zero"):
            model(x)


class _Inject:
    """A trace function raising KeyboardInterrupt at the ``n``-th traced line event."""

    def __init__(self, n: int | None) -> None:
        self.n, self.seen = n, 0

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename not in TRACED:
            return None  # not a frame we trace (no per-line events there)
        return self._line

    def _line(self, frame, event, arg):
        if event == "line":
            self.seen += 1
            if self.seen == self.n:
                raise KeyboardInterrupt(f"injected at {frame.f_code.co_name}:{frame.f_lineno}")
        return self._line


def _count(body: str) -> int:
    model = _model()
    inj = _Inject(None)
    sys.settrace(inj)
    try:
        _run(model, body)
    finally:
        sys.settrace(None)
    return inj.seen


@pytest.mark.parametrize("body", ["hooked", "capture", "ablate"])
def test_interrupt_at_every_line_leaves_no_hook(body: str) -> None:
    total = _count(body)
    assert total > 50  # registration, forward hooks and removal were traced
    interrupted = 0
    old = sys.gettrace()
    for n in range(1, total + 1):
        model = _model()
        inj = _Inject(n)
        sys.settrace(inj)
        try:
            _run(model, body)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(old)
        assert _no_hooks(model), f"{body}: a hook was left after an interrupt at event {n}"
    assert interrupted == total  # every injection surfaced as a KeyboardInterrupt


def test_interrupt_right_after_each_torch_registration(monkeypatch) -> None:
    # The window that leaked before: torch has stored the hook, we have not recorded it.
    for kind, n_sites in (("register_forward_hook", 3), ("register_forward_pre_hook", 2)):
        for k in range(n_sites):
            model = _model()
            real = getattr(nn.Module, kind)
            calls = {"n": 0}

            def wrapped(self, *a, _real=real, _k=k, calls=calls, **kw):
                handle = _real(self, *a, **kw)
                calls["n"] += 1
                if calls["n"] == _k + 1:
                    raise KeyboardInterrupt
                return handle

            monkeypatch.setattr(nn.Module, kind, wrapped)
            with pytest.raises(KeyboardInterrupt):
                _run(model, "hooked")
            monkeypatch.undo()
            assert _no_hooks(model), (kind, k)


def test_user_hooks_are_kept() -> None:
    model = _model()
    mine = model[2].register_forward_hook(lambda m, i, o: None)
    _run(model, "hooked")
    assert list(model[2]._forward_hooks) == [mine.id]
