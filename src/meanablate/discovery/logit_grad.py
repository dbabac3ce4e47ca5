"""Closed-form gradients of the built-in task metrics with respect to the logits.

EAP needs only ``d sum_b metric[b] / d logits`` to start its backward; for the metrics
below that gradient has a closed form that costs one softmax (or none), where autograd
through the metric runs a float64 copy of the logits, a log-softmax, its backward and a
scatter, ``[batch, pos, vocab]`` each. The shapes and fields are checked as the metric
itself checks them, so a bad batch fails the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from meanablate import metrics as M
from meanablate.metrics import Metric

__all__ = ["logit_grad"]


def logit_grad(m: Metric, logits: Tensor, batch: Any, clean: Tensor | None) -> Tensor | None:
    """``d (sum over examples of m(logits)) / d logits``, shaped like ``logits``, for
    ``loss``, ``logit_diff`` and ``prob``; ``None`` for any other metric (use autograd).

    Each example's value is a mean over its scored positions, so position ``p`` of
    example ``b`` carries the weight ``mask[b, p] / count[b]``:

    - ``loss`` (cross-entropy): ``w * (softmax(z) - onehot(target))``;
    - ``logit_diff``: ``w * (onehot(target) - onehot(wrong))``;
    - ``prob``: ``w * p_t * (onehot(target) - softmax(z))``.

    >>> z = torch.zeros(1, 2, 3)
    >>> batch = {"target": torch.tensor([[0, -100]])}
    >>> logit_grad(M.get_metric("loss"), z, batch, None)[0, 0]
    tensor([-0.6667,  0.3333,  0.3333])
    """
    if m.fn not in (M.loss, M.logit_diff, M.prob):
        return None
    name = m.name
    M.check_shapes(logits, batch, clean, f"metric {name!r}")
    lg = M._seq(logits)
    mask = M.scored_mask(batch, logits, f"metric {name!r}")
    vocab = lg.shape[-1]
    t = M._check_classes(M._seq_target(M._need(batch, "target", name)), mask, vocab, name)
    counts = M._scored_counts(mask, name).double()
    w = (mask.double() / counts[:, None]).to(lg.dtype)[..., None]  # [batch, pos, 1]
    if m.fn is M.logit_diff:
        wrong = M._seq_target(M._need(batch, "wrong", name))
        wr = M._check_classes(wrong, mask, vocab, name)
        g = torch.zeros_like(lg)
        g.scatter_add_(-1, t[..., None], w)
        g.scatter_add_(-1, wr[..., None], -w)
    else:
        g = torch.softmax(lg, -1)
        if m.fn is M.loss:
            g.scatter_add_(-1, t[..., None], torch.full_like(w, -1.0))
            g.mul_(w)
        else:  # prob: d p_t / d z = p_t (onehot(t) - p)
            pt = g.gather(-1, t[..., None])
            g.neg_().scatter_add_(-1, t[..., None], torch.ones_like(pt)).mul_(pt * w)
    return g.view_as(logits)
