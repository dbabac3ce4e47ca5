"""Prompts -> batches (one reader for the API and the CLI) and ``as_batches``."""

from __future__ import annotations

import json

import pytest
import torch

import meanablate as ma
from meanablate.data import as_batches, corrupt_source, prompt_batches, read_prompts

WORDS = ["<pad>", "<unk>", "Mary", "John", "gave", "the", "cat", "dog", "to", "a", "mat"]
PROMPTS = [
    {"text": "Mary gave the cat to", "target": "John", "wrong": "Mary"},
    {"text": "John gave the dog", "target": "Mary", "wrong": "John"},
    {"text": "the cat", "target": "mat", "wrong": "dog"},
]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>"
    )


def expected(batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Built by hand from the word list: right padding with <pad> (0), answers at the end."""
    out = []
    for start in range(0, len(PROMPTS), batch_size):
        chunk = PROMPTS[start : start + batch_size]
        ids = [[WORDS.index(w) for w in p["text"].split()] for p in chunk]
        n = max(map(len, ids))
        b = {
            "input_ids": torch.tensor([x + [0] * (n - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids]),
        }
        for f in ("target", "wrong"):
            rows = []
            for x, p in zip(ids, chunk):
                row = [-100] * n
                row[len(x) - 1] = WORDS.index(p[f])
                rows.append(row)
            b[f] = torch.tensor(rows)
        out.append(b)
    return out


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_every_source_gives_the_hand_built_batches(tokenizer, tmp_path, batch_size):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    want = expected(batch_size)
    same(prompt_batches(PROMPTS, tokenizer, batch_size=batch_size), want)
    same(prompt_batches(path, tokenizer, batch_size=batch_size), want)
    same(read_prompts(path, tokenizer, batch_size), want)
    from meanablate.cli.prompts import read_prompts as cli_read

    same(cli_read(str(path), tokenizer, batch_size, None), want)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(PROMPTS)
    same(prompt_batches(ds, tokenizer, batch_size=batch_size), want)


def test_plain_strings_and_n_examples(tokenizer, tmp_path):
    texts = [p["text"] for p in PROMPTS]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n\n")
    a = prompt_batches(texts, tokenizer, n_examples=2)
    b = prompt_batches(tmp_path / "p.txt", tokenizer, n_examples=2)
    same(a, b)
    assert sorted(a[0]) == ["attention_mask", "input_ids"]
    assert a[0]["input_ids"].shape == (2, 5)


def test_corrupt_prompts(tokenizer):
    prompts = [
        {"text": "Mary gave the cat to", "target": "John", "corrupt": "John gave the dog to"},
        {"text": "the cat", "target": "mat", "corrupt": "a dog"},
    ]
    (b,) = prompt_batches(prompts, tokenizer)
    assert b["corrupt"].tolist() == [[3, 4, 5, 7, 8], [9, 7, 0, 0, 0]]
    src = corrupt_source(b)
    assert torch.equal(src["attention_mask"], b["attention_mask"])
    with pytest.raises(ValueError, match=r"prompts\[0\]: corrupt prompt is 2 tokens"):
        prompt_batches([{"text": "the cat sat", "corrupt": "a dog"}], tokenizer)


def test_bad_prompts(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"prompts\[1\]: target 'cat dog' is 2 tokens"):
        prompt_batches([PROMPTS[0], {**PROMPTS[1], "target": "cat dog"}], tokenizer)
    with pytest.raises(ValueError, match=r"prompts\[1\]: missing field\(s\) \['wrong'\]"):
        prompt_batches([PROMPTS[0], {"text": "a", "target": "mat"}], tokenizer)
    with pytest.raises(TypeError, match="prompts must be a list"):
        prompt_batches(3, tokenizer)
    with pytest.raises(FileNotFoundError, match="no such file"):
        prompt_batches(tmp_path / "nope.jsonl", tokenizer)
    with pytest.raises(ValueError, match="id 99 outside the vocabulary"):
        prompt_batches([{"text": "a", "target": 99}], tokenizer)


def test_as_batches_accepts_one_batch_and_refuses_the_rest():
    t = torch.zeros(3, 4, dtype=torch.long)
    assert len(as_batches(t)) == 1 and as_batches(t)[0] is t
    d = {"input_ids": t}
    assert as_batches(d) == [d]
    gen = (x for x in [t])
    assert as_batches(gen) is gen  # streams stay lazy
    with pytest.raises(TypeError, match=r"batches must be a tensor.*got str"):
        as_batches("Mary gave")
    with pytest.raises(TypeError, match=r"batches\[1\] must be a tensor or a dict.*got int"):
        as_batches([t, 3])
    with pytest.raises(TypeError, match="got int"):
        as_batches(5)


def test_public_functions_take_one_batch():
    from meanablate.organisms.transformer import HookedTransformer, TransformerConfig

    torch.manual_seed(0)
    model = HookedTransformer(
        TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=7, n_ctx=6)
    ).eval()
    tokens = torch.randint(0, 7, (4, 6))
    units = ma.transformer_units(model)
    sites = sorted({ma.parse_site(u).key for u in units})
    one = ma.compute_means(model, sites, tokens)
    many = ma.compute_means(model, sites, [tokens])
    for k in sites:
        assert torch.equal(one[k], many[k])
    s1 = ma.sweep(model, tokens, units, one, metric="kl")
    s2 = ma.sweep(model, [tokens], units, one, metric="kl")
    assert s1.per_example.shape == (len(units), 4)  # rows of the tensor are not batches
    assert torch.equal(s1.per_example, s2.per_example)
    c1 = ma.discover(model, {"tokens": tokens}, one, units=units, metric="kl", threshold=0.01)
    c2 = ma.discover(model, [{"tokens": tokens}], one, units=units, metric="kl", threshold=0.01)
    assert c1.kept == c2.kept
    with pytest.raises(TypeError, match="batches must be"):
        ma.sweep(model, "tokens", units, one)
