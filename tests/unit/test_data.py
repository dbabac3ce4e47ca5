"""Streaming batches from JSONL, text and HF dataset directories: lazy, sharded, exact."""

from __future__ import annotations

import json
import math
import pickle
import tracemalloc
import types

import pytest
import torch

from meanablate import capture, compute_means
from meanablate.data import (
    TextBatches,
    batch_records,
    read_jsonl,
    read_text,
    shard_iterable,
    stream_batches,
)
from meanablate.organisms import HookedTransformer, TransformerConfig


def tok(text: str) -> list[int]:
    return [int(w) for w in text.split()]


def write_jsonl(path, rows, newline="\n", trailing=True):
    text = newline.join(json.dumps(r) for r in rows) + (newline if trailing else "")
    path.write_bytes(text.encode())
    return path


def texts_of(batches, key="input_ids"):
    out = []
    for b in batches:
        for ids, mask in zip(b[key].tolist(), b["attention_mask"].tolist()):
            out.append(" ".join(str(i) for i, m in zip(ids, mask) if m))
    return out


def test_jsonl_batches_pad_and_mask(tmp_path):
    rows = [
        {"text": "1 2 3", "target": 1},
        {"text": "4", "target": 0},
        {"text": "5 6", "target": 2},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    batches = list(stream_batches(path, tok, batch_size=2, fields=("target",)))
    assert len(batches) == 2
    b = batches[0]
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["input_ids"].dtype == torch.long
    assert b["target"].tolist() == [1, 0]
    assert batches[1]["input_ids"].tolist() == [[5, 6]]


def test_per_position_fields_pad_like_tokens(tmp_path):
    rows = [
        {"text": "1 2 3", "target": [-100, 5, 6], "target_value": [0.5, 1.0, 2.0], "name": "a"},
        {"text": "4", "target": [7], "target_value": [3.0], "name": "b"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    fields = ("target", "target_value", "name")
    (b,) = stream_batches(path, tok, batch_size=4, fields=fields)
    assert b["target"].tolist() == [[-100, 5, 6], [7, -100, -100]]
    assert b["target_value"][1, 0] == 3.0 and math.isnan(b["target_value"][1, 2])
    assert b["name"] == ["a", "b"]  # non-numeric fields stay lists
    (left,) = stream_batches(path, tok, batch_size=4, fields=fields, padding_side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert left["target"].tolist() == [[-100, 5, 6], [-100, -100, 7]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_text_file_one_prompt_per_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("1 2\n\n3\r\n  \n4 5 6")
    batches = list(stream_batches(path, tok, batch_size=2, pad_token_id=9))
    assert texts_of(batches) == ["1 2", "3", "4 5 6"]
    assert batches[0]["input_ids"].tolist() == [[1, 2], [3, 9]]


def test_max_length_truncates(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("1 2 3 4 5\n6\n")
    (b,) = stream_batches(path, tok, max_length=3)
    assert b["input_ids"].tolist() == [[1, 2, 3], [6, 0, 0]]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"text": "1 2"', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"txt": "1"}', "field 'text' must be a string"),
        ('{"text": 5}', "field 'text' must be a string"),
        ('{"text": "1"}', r"missing field\(s\) \['target'\]"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "1 2", "target": 0})
    path.write_text("\n".join([good, "", good, line, good]) + "\n")
    with pytest.raises(ValueError, match=match) as info:
        list(stream_batches(path, tok, fields=("target",)))
    assert f"{path}, line 4" in str(info.value)


def test_bad_line_number_is_right_in_a_later_shard(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": str(i)}) for i in range(50)]
    lines[41] = "{oops"
    path.write_text("\n".join(lines) + "\n")
    source = stream_batches(path, tok)
    errors = []
    for i in range(4):
        try:
            list(source.shard(i, 4))
        except ValueError as exc:
            errors.append((i, str(exc)))
    assert len(errors) == 1 and errors[0][0] == 3
    assert f"{path}, line 42: invalid JSON" in errors[0][1]


def test_empty_tokenization_is_an_error_naming_the_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "1"}, {"text": " "}])
    with pytest.raises(ValueError, match=r"line 2: tokenized to no tokens"):
        list(stream_batches(path, tok))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 40])
@pytest.mark.parametrize(("newline", "trailing"), [("\n", True), ("\r\n", False)])
def test_shards_partition_the_lines(tmp_path, k, newline, trailing):
    rows = [{"text": " ".join(["7"] * (1 + i % 13)) + f" {i}"} for i in range(37)]
    path = write_jsonl(tmp_path / "d.jsonl", rows, newline=newline, trailing=trailing)
    source = stream_batches(path, tok, batch_size=4)
    want = [r["text"] for r in rows]
    parts = [[r.text for r in source.shard(i, k).records()] for i in range(k)]
    assert [t for p in parts for t in p] == want  # disjoint, in order, nothing lost
    assert texts_of(source) == want


def test_shard_arguments_are_checked(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "1"}])
    source = stream_batches(path, tok)
    with pytest.raises(ValueError, match="out of range"):
        source.shard(2, 2)
    with pytest.raises(ValueError, match="already a shard"):
        source.shard(0, 2).shard(0, 2)
    with pytest.raises(FileNotFoundError):
        stream_batches(tmp_path / "missing.jsonl", tok)
    with pytest.raises(ValueError, match="no fields"):
        stream_batches(path, tok, format="text", fields=("a",))


def test_empty_file_and_empty_shards(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("")
    assert list(stream_batches(path, tok)) == []
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "1 2"}])
    source = stream_batches(one, tok)
    assert sum(len(list(source.shard(i, 10))) for i in range(10)) == 1


def test_streaming_is_lazy(tmp_path):
    # A bad line at the end is not read before the first batch is asked for.
    path = tmp_path / "lazy.jsonl"
    path.write_text(json.dumps({"text": "1"}) + "\n" * 2 + "not json\n")
    it = iter(stream_batches(path, tok, batch_size=1))
    assert isinstance(it, types.GeneratorType)
    assert next(it)["input_ids"].tolist() == [[1]]
    with pytest.raises(ValueError, match="line 3"):
        next(it)
    assert isinstance(read_jsonl(path), types.GeneratorType)
    assert isinstance(read_text(path), types.GeneratorType)


def _peak_bytes(path) -> int:
    tracemalloc.start()
    try:
        for _ in stream_batches(path, tok, batch_size=16):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_file_size(tmp_path):
    line = json.dumps({"text": " ".join(["3"] * 20)}) + "\n"
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text(line * 500)
    big.write_text(line * 5000)
    assert big.stat().st_size == 10 * small.stat().st_size
    peak_small, peak_big = _peak_bytes(small), _peak_bytes(big)
    assert peak_big < 1.5 * peak_small + 50_000, (peak_small, peak_big)
    assert peak_big < big.stat().st_size / 4, (peak_big, big.stat().st_size)


def test_source_pickles_small_and_is_reiterable(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": str(i)} for i in range(10)])
    source = stream_batches(path, tok, batch_size=3)
    assert isinstance(source, TextBatches)
    again = pickle.loads(pickle.dumps(source))
    assert texts_of(again) == texts_of(source) == [str(i) for i in range(10)]


def test_callable_tokenizer_may_return_tensor_or_dict(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("1 2\n3\n")
    as_tensor = list(stream_batches(path, lambda t: torch.tensor([tok(t)])))
    as_dict = list(stream_batches(path, lambda t: {"input_ids": tok(t)}))
    assert as_tensor[0]["input_ids"].tolist() == as_dict[0]["input_ids"].tolist()
    with pytest.raises(TypeError, match="line 1: the tokenizer must return"):
        list(stream_batches(path, lambda t: t))


def hf_tokenizer(padding_side="right"):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {
        "[PAD]": 0,
        "[UNK]": 1,
        **{w: i + 2 for i, w in enumerate(["the", "cat", "sat", "on", "mat"])},
    }
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", padding_side=padding_side
    )


def test_hf_tokenizer_batches(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("the cat sat\non the mat dog\nmat\n")
    (b,) = stream_batches(path, hf_tokenizer(), batch_size=8)
    assert b["input_ids"].tolist() == [[2, 3, 4, 0], [5, 2, 6, 1], [6, 0, 0, 0]]
    assert b["attention_mask"].sum(1).tolist() == [3, 4, 1]
    (left,) = stream_batches(path, hf_tokenizer("left"), batch_size=8, max_length=2)
    assert left["input_ids"].tolist() == [[2, 3], [5, 2], [0, 6]]


def test_hf_dataset_directory_streams_and_shards(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [" ".join(str((i + j) % 9) for j in range(1 + i % 4)) for i in range(23)]
    ds = datasets.Dataset.from_dict({"text": texts, "target": list(range(23))})
    ds.save_to_disk(str(tmp_path / "ds"))
    source = stream_batches(tmp_path / "ds", tok, batch_size=5, fields=("target",))
    assert source.format == "hf"
    batches = list(source)
    assert texts_of(batches) == texts
    assert torch.cat([b["target"] for b in batches]).tolist() == list(range(23))
    for k in (2, 3, 7):
        assert [t for i in range(k) for t in texts_of(source.shard(i, k))] == texts
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="pass split="):
        list(stream_batches(tmp_path / "dd", tok))
    assert texts_of(stream_batches(tmp_path / "dd", tok, split="train")) == texts
    with pytest.raises(ValueError, match=r"no column\(s\) \['wrong'\]"):
        list(stream_batches(tmp_path / "ds", tok, fields=("wrong",)))


def test_compute_means_from_a_stream_equals_in_memory(tmp_path):
    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=10, n_ctx=12)
    torch.manual_seed(0)
    model = HookedTransformer(cfg).eval()
    rows = [{"text": " ".join(str((i * j) % 10) for j in range(1 + i % 6))} for i in range(30)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    source = stream_batches(path, tok, batch_size=7)  # input_ids reach forward as tokens
    site = "blocks.0.hook_resid_post"
    got = compute_means(model, [site], source)
    want = torch.zeros(cfg.d_model, dtype=torch.float64)
    n = 0
    for r in rows:
        with torch.inference_mode(), capture(model, [site]) as store:
            model(torch.tensor([tok(r["text"])]))
        want += store[site][0].double().sum(0)
        n += len(tok(r["text"]))
    assert float(got.counts[site]) == n
    torch.testing.assert_close(got[site], want / n, rtol=1e-5, atol=1e-7)


def test_batch_records_and_shard_iterable():
    from meanablate.data import Record

    recs = [Record(str(i), {}) for i in range(1, 6)]
    assert [b["input_ids"].shape[0] for b in batch_records(recs, tok, batch_size=2)] == [2, 2, 1]
    with pytest.raises(ValueError, match="batch_size"):
        list(batch_records(recs, tok, batch_size=0))
    parts = [list(shard_iterable(range(10), i, 3)) for i in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
