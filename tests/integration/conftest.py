"""Fixtures shared by the command-line tests."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = [
        "<unk>",
        "<pad>",
        "the",
        "cat",
        "dog",
        "sat",
        "on",
        "mat",
        "a",
        "Mary",
        "John",
        "gave",
        "to",
    ]
    tok = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>"
    )
    config = transformers.GPT2Config(
        vocab_size=len(words), n_positions=16, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    import torch

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    prompts = path.parent / "prompts.jsonl"
    lines = [
        {"text": "Mary gave the cat to", "target": "John", "wrong": "Mary"},
        {"text": "John gave the dog to", "target": "Mary", "wrong": "John"},
        {"text": "the cat sat on a", "target": "mat", "wrong": "dog"},
        {"text": "a dog sat on the", "target": "mat", "wrong": "cat"},
    ]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path, prompts
