"""compute_means(kind=...): per-position, plain, and plain except chosen positions, against
a naive loop over every real token (padding excluded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meanablate.stats import MEAN_KINDS, Means, compute_means


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 3)

    def forward(self, tokens, attention_mask=None):
        return self.emb(tokens)


def data():
    gen = torch.Generator().manual_seed(2)
    out = []
    for n, length in ((3, 5), (4, 5)):
        tokens = torch.randint(11, (n, length), generator=gen)
        mask = torch.ones(n, length, dtype=torch.long)
        mask[0, 3:] = 0  # right padding in one row
        out.append({"tokens": tokens, "attention_mask": mask})
    return out


def naive(model, batches, positions) -> torch.Tensor:
    """Mean over every real token at ``positions`` (a python loop)."""
    total, count = torch.zeros(3, dtype=torch.float64), 0
    for b in batches:
        acts = model(b["tokens"]).double()
        for i in range(acts.shape[0]):
            for p in positions:
                if b["attention_mask"][i, p]:
                    total += acts[i, p]
                    count += 1
    return total / count


@pytest.mark.parametrize("keep", [[0], [0, 4], [2]])
def test_each_kind_matches_a_naive_loop(keep) -> None:
    model, batches = Embed().eval(), data()
    with torch.no_grad():
        per = compute_means(model, ["emb"], batches, kind="per_position")["emb"]
        plain = compute_means(model, ["emb"], batches, kind="plain")["emb"]
        exc = compute_means(model, ["emb"], batches, kind="plain_except", keep_positions=keep)
        for p in range(5):
            torch.testing.assert_close(per[p], naive(model, batches, [p]))
        torch.testing.assert_close(plain, naive(model, batches, range(5)))
        pooled = naive(model, batches, [p for p in range(5) if p not in keep])
        for p in range(5):
            want = per[p] if p in keep else pooled
            torch.testing.assert_close(exc["emb"][p], want)
    assert exc.per_position and exc.kind == "plain_except"
    assert exc.metadata["keep_positions"] == sorted(keep)


def test_kind_is_recorded_and_survives_save_and_load(tmp_path) -> None:
    model, batches = Embed().eval(), data()
    for kind in MEAN_KINDS:
        m = compute_means(model, ["emb"], batches, kind=kind)
        assert m.kind == kind and m.metadata["mean_kind"] == kind
        m.save(tmp_path / f"{kind}.safetensors")
        back = Means.load(tmp_path / f"{kind}.safetensors")
        assert back.kind == kind and torch.equal(back["emb"], m["emb"])
    # the old switch still works and means the same
    old = compute_means(model, ["emb"], batches, per_position=True)
    assert old.kind == "per_position"
    assert torch.equal(
        old["emb"], compute_means(model, ["emb"], batches, kind="per_position")["emb"]
    )


def test_bad_kinds_and_positions_raise() -> None:
    model, batches = Embed().eval(), data()
    with pytest.raises(ValueError, match="kind must be one of per_position, plain"):
        compute_means(model, ["emb"], batches, kind="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_position=True contradicts kind='plain'"):
        compute_means(model, ["emb"], batches, per_position=True, kind="plain")
    with pytest.raises(ValueError, match="keep_positions is for kind='plain_except'"):
        compute_means(model, ["emb"], batches, kind="plain", keep_positions=[0])
    for bad in ([-1], [0.5], [True]):
        with pytest.raises(ValueError, match="keep_positions must be position indices"):
            compute_means(model, ["emb"], batches, kind="plain_except", keep_positions=bad)
    with pytest.raises(ValueError, match="reach past the 5 positions"):
        compute_means(model, ["emb"], batches, kind="plain_except", keep_positions=[5])
    with pytest.raises(ValueError, match="no tokens outside keep_positions"):
        compute_means(model, ["emb"], batches, kind="plain_except", keep_positions=range(5))
