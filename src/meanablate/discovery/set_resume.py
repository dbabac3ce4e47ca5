"""Sets of ablated units on a family that resumes from a block (Hugging Face, bridges).

:class:`~meanablate.discovery.subsets.SetMetric` asks for the metric of one ablated set
after another on the same batches. On a family whose forward is exactly embed, blocks,
tail (:meth:`Family.can_resume`), the clean run of each batch records how every block is
called (:func:`~meanablate.discovery.layerskip.record_block_calls`); a set whose units
all sit inside the blocks then runs, under ``ablate()``'s hooks, only from the block of
its earliest unit (:func:`~meanablate.discovery.layerskip.run_from`): the blocks before
it cannot change, and every later block is called as a module, so each unit's hook
fires as in the full forward. Discrete metrics get the hooked forward's own logits bit
for bit (the same modules on the same inputs); continuous ones also run the last block
and the tail only at the positions the metric reads, when no unit of the set sits in the
last block (whose hooks that route would skip), up to float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from meanablate.discovery import fastpath, layerskip
from meanablate.discovery.evaluate import CLEAN_CACHE_BYTES
from meanablate.discovery.sweep import restrict_positions
from meanablate.families import Family, family_of
from meanablate.hooks import output_tensor, run_model
from meanablate.intervene import Method, ablate
from meanablate.metrics import Metric
from meanablate.sites import parse_site
from meanablate.stats import Means

__all__ = ["ResumedSets"]


class ResumedSets:
    """The clean run of each batch with its recorded block calls (see the module
    docstring). Build with :meth:`build`; call with a set of units."""

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        batches: Sequence[Any],
        metric: Metric,
        calls: list[layerskip.BlockCalls],
        clean: list[Tensor],
    ) -> None:
        self.model, self.family, self.batches, self.metric = model, family, batches, metric
        self.calls, self.clean = calls, clean
        found = family.blocks()
        assert found is not None
        self.prefix, self.n_blocks = found[0], len(found[1])
        # What a continuous metric reads of each batch does not depend on the set.
        self.reads: list[tuple[Tensor | None, Any, Tensor]] = []
        for batch, out in zip(batches, clean):
            positions, sub = None, batch
            if not metric.discrete and isinstance(batch, Mapping):
                positions, sub = restrict_positions(batch, out)
            self.reads.append((positions, sub, out if positions is None else out[:, positions]))

    @classmethod
    def build(
        cls, model: nn.Module, batches: Sequence[Any], metric: Metric, method: Method
    ) -> ResumedSets | None:
        """``None`` where sets cannot resume: a family that cannot, resampled sources
        (their hooks run a second input), or recorded calls past the clean-cache budget."""
        family = family_of(model)
        if method not in ("mean", "zero") or not family.can_resume():
            return None
        calls, clean, seen, total = [], [], set(), 0
        with torch.inference_mode():
            for batch in batches:
                with layerskip.record_block_calls(family) as record:
                    out = output_tensor(run_model(model, batch))
                if record is None:
                    return None
                tensors = [out]
                for call in record.calls:
                    if call is not None:
                        tensors += _tensors(call)
                for t in tensors:
                    if id(t) not in seen:
                        seen.add(id(t))
                        total += t.numel() * t.element_size()
                if total > CLEAN_CACHE_BYTES:
                    return None
                calls.append(record)
                clean.append(out)
        return cls(model, family, batches, metric, calls, clean)

    def start(self, ablated: Sequence[str]) -> tuple[int, int] | None:
        """The first and last block holding a unit of ``ablated``, or ``None`` when a
        unit sits outside the blocks, a batch cannot resume there, or the model carries
        hooks of its own (which a resumed run would skip)."""
        layers = [
            layerskip.block_of(parse_site(u).module, self.prefix, self.n_blocks) for u in ablated
        ]
        if not layers or any(x is None for x in layers) or fastpath.any_hooks(self.model):
            return None
        first, last = min(layers), max(layers)  # type: ignore[type-var]
        if not all(c.resumable_from(first) for c in self.calls):  # type: ignore[arg-type]
            return None
        return first, last  # type: ignore[return-value]

    def __call__(
        self, ablated: Sequence[str], means: Means | None, method: Method, span: tuple[int, int]
    ) -> Tensor:
        """``[n_examples]``: the metric with ``ablated`` ablated together, resumed from
        block ``span[0]`` (from :meth:`start`)."""
        first, last = span
        cut_last = last < self.n_blocks - 1  # no hook of the set in the last block
        values = []
        with torch.inference_mode(), ablate(self.model, list(ablated), means, method=method):
            for batch, calls, out, (positions, sub, clean) in zip(
                self.batches, self.calls, self.clean, self.reads
            ):
                if positions is None:
                    logits = layerskip.run_from(self.family, calls, first)
                    values.append(self.metric(logits, batch, out).double().cpu())
                    continue
                if cut_last:
                    logits = layerskip.run_from(self.family, calls, first, positions=positions)
                else:
                    logits = layerskip.run_from(self.family, calls, first)[:, positions]
                values.append(self.metric(logits, sub, clean).double().cpu())
        return torch.cat(values)


def _tensors(call: tuple[tuple, dict]) -> list[Tensor]:
    args, kwargs = call
    out: list[Tensor] = []
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, tuple):
            out += [x for x in v if isinstance(x, Tensor)]
    return out
