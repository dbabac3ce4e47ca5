"""Means that padding cannot poison, and means files: byte-stable, and every bad file one
documented error (``MeansFileError``, a ``ValueError``) that names the file."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import meanablate as ma
from meanablate.errors import MeansFileError, MissingSiteError
from meanablate.means_io import safetensors_bytes


class PaddedMHA(nn.Module):
    """A causal ``nn.MultiheadAttention``: a left-padded query sees only padded keys, so the
    softmax is over nothing and the model writes NaN at every padded position."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        t = x.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        h, _ = self.attn(
            x, x, x, attn_mask=causal, key_padding_mask=attention_mask == 0, need_weights=False
        )
        return self.out(h)


def _left_padded_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for pads in ([0, 2, 1], [3, 0]):
        ids = torch.randint(0, 10, (len(pads), 5), generator=g)
        mask = torch.ones_like(ids)
        for row, p in enumerate(pads):
            mask[row, :p] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize("per_position", [False, True])
def test_nan_at_padded_positions_never_reaches_a_mean(per_position: bool) -> None:
    torch.manual_seed(0)
    model = PaddedMHA().eval()
    batches = _left_padded_batches()
    with torch.inference_mode():
        outs = [model(**b) for b in batches]
    assert any(torch.isnan(o).any() for o in outs)  # the model really writes NaN at padding
    means = ma.compute_means(model, ["out", "attn"], batches, per_position=per_position)
    # naive reference: a Python loop over the real tokens only, float64
    for key in ("out", "attn"):
        store = []
        for b in batches:
            with torch.inference_mode(), ma.capture(model, [key]) as acts:
                model(**b)
            store.append((acts[key].double(), b["attention_mask"]))
        if per_position:
            for pos in range(5):
                rows = [a[i, pos] for a, m in store for i in range(a.shape[0]) if m[i, pos]]
                want = torch.stack(rows).mean(0) if rows else torch.zeros(8, dtype=torch.float64)
                torch.testing.assert_close(means[key][pos], want, rtol=1e-12, atol=1e-14)
                assert float(means.counts[key][pos]) == len(rows)
        else:
            rows = [
                a[i, p] for a, m in store for i in range(a.shape[0]) for p in range(5) if m[i, p]
            ]
            torch.testing.assert_close(means[key], torch.stack(rows).mean(0), rtol=1e-12, atol=0)
            assert float(means.counts[key]) == len(rows)
        assert torch.isfinite(means[key]).all()


def test_attention_mask_values_other_than_0_and_1_are_refused() -> None:
    model = PaddedMHA().eval()
    batch = _left_padded_batches()[0]
    bad = {**batch, "attention_mask": batch["attention_mask"] * 2}
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 .* and 1"):
        ma.compute_means(model, ["out"], [bad])


# -- files --------------------------------------------------------------------------------
def _means() -> ma.Means:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return ma.compute_means(model, ["0", "2"], [torch.randn(5, 3), torch.randn(2, 3)])


def test_identical_means_give_identical_bytes(tmp_path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _means().save(a)
    _means().save(b)
    assert a.read_bytes() == b.read_bytes()
    # the safetensors library's own writer orders its metadata differently from call to call
    # (a hash map): ours must stay readable by it, tensor for tensor
    raw = load_file(str(a))
    m = _means()
    assert torch.equal(raw["mean::0"], m["0"]) and torch.equal(
        raw["count::2"], m.counts["2"].reshape(-1)
    )
    loaded = ma.Means.load(a)
    assert loaded.metadata == m.metadata and loaded.keys() == m.keys()


def test_writer_is_canonical_for_any_insertion_order() -> None:
    t = {"b": torch.arange(3.0), "a": torch.ones(2, 2, dtype=torch.float64)}
    meta = {"z": "1", "a": "2", "format": "x"}
    one = safetensors_bytes(t, meta)
    two = safetensors_bytes(dict(reversed(list(t.items()))), dict(reversed(list(meta.items()))))
    assert one == two
    (n,) = struct.unpack("<Q", one[:8])
    assert n % 8 == 0 and list(json.loads(one[8 : 8 + n])) == ["__metadata__", "a", "b"]


class _Boom:
    ran = False

    def __reduce__(self):
        return (_set_ran, ())


def _set_ran() -> None:
    _Boom.ran = True


def _bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    _means().save(good)
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])

    def with_meta(**changes):
        h = json.loads(json.dumps(header))
        for k, v in changes.items():
            if v is None:
                h["__metadata__"].pop(k)
            else:
                h["__metadata__"][k] = v
        text = json.dumps(h).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + data[8 + n :]

    files = {
        "truncated": data[: len(data) - 5],
        "header cut": data[:20],
        "corrupted header": data[:8] + b"\x00\xff" + data[10:],
        "huge header length": struct.pack("<Q", 1 << 60) + data[8:],
        "empty": b"",
        "pickle": pickle.dumps(_Boom()),
        "no format": with_meta(format=None),
        "other format": with_meta(format="something.else"),
        "per_position not JSON": with_meta(per_position="yes please"),
        "per_position not a bool": with_meta(per_position="1"),
        "metadata not a dict": with_meta(metadata="[1, 2]"),
        "no sites": with_meta(sites=None),
        "sites disagree": with_meta(sites='["0"]'),
    }
    torch_file = tmp_path / "ts"
    torch.save({"x": torch.zeros(2), "boom": _Boom()}, torch_file)
    files["torch.save"] = torch_file.read_bytes()
    out = {}
    for name, blob in files.items():
        p = tmp_path / (name.replace(" ", "_").replace(".", "_") + ".safetensors")
        p.write_bytes(blob)
        out[name] = p
    stray = tmp_path / "stray.safetensors"
    raw = load_file(str(good))
    raw["weights"] = torch.zeros(1)
    save_file(raw, str(stray), metadata=header["__metadata__"])
    out["stray tensor"] = stray
    counts = tmp_path / "counts.safetensors"
    raw = load_file(str(good))
    raw["count::0"] = torch.ones(3, dtype=torch.float64)
    save_file(raw, str(counts), metadata=header["__metadata__"])
    out["count of the wrong shape"] = counts
    out["missing"] = tmp_path / "nope.safetensors"
    return out


def test_every_bad_file_is_one_error_naming_the_file(tmp_path) -> None:
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(MeansFileError) as err:
            ma.Means.load(path)
        assert isinstance(err.value, ValueError), name
        assert str(path) in str(err.value), name
        assert err.value.path == str(path)
    assert not _Boom.ran  # nothing was ever unpickled


def test_pickles_are_named_as_such(tmp_path) -> None:
    files = _bad_files(tmp_path)
    with pytest.raises(MeansFileError, match=r"pickle.*not unpickled"):
        ma.Means.load(files["pickle"])
    with pytest.raises(MeansFileError, match=r"torch.save.*not unpickled"):
        ma.Means.load(files["torch.save"])
    assert not _Boom.ran


def test_missing_site_is_a_key_error_and_a_value_error() -> None:
    m = _means()
    with pytest.raises(
        MissingSiteError, match=r"no mean for site '1'; means were computed for 0, 2"
    ):
        m["1"]
    for kind in (KeyError, ValueError):
        with pytest.raises(kind):
            m["1"]
