"""Encoders through the CLI: loaded as masked LMs, prompts scored at their mask token."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import meanablate as ma
from meanablate.cli import app
from meanablate.cli.hf import is_masked_lm
from meanablate.cli.prompts import read_prompts
from meanablate.config import InputError
from meanablate.metrics import scored_mask

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a"]


def _tokenizer():
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing

    tok = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    config = transformers.BertConfig(
        vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "tiny-bert"
    transformers.BertForMaskedLM(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def test_encoder_configs_are_masked_lms(tiny_bert) -> None:
    config = transformers.AutoConfig.from_pretrained(tiny_bert, local_files_only=True)
    assert is_masked_lm(config)
    assert is_masked_lm(transformers.BertConfig())  # no architectures: an encoder
    assert not is_masked_lm(transformers.GPT2Config())
    assert not is_masked_lm(transformers.BertConfig(is_decoder=True))


def test_prompts_are_scored_at_the_mask(tmp_path) -> None:
    tok = _tokenizer()
    prompts = tmp_path / "p.jsonl"
    lines = [
        {"text": "the cat sat on the [MASK]", "target": "mat"},
        {"text": "a [MASK] sat", "target": "cat"},
    ]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (batch,) = read_prompts(str(prompts), tok, 8, None, mask_token_id=tok.mask_token_id)
    ids = batch["input_ids"]
    at_mask = ids == tok.mask_token_id
    assert torch.equal(batch["metric_mask"], at_mask)
    assert torch.equal(batch["target"] != -100, at_mask)
    assert batch["target"][at_mask].tolist() == [WORDS.index("mat"), WORDS.index("cat")]
    # the last real token is [SEP]: a causal reading would score there
    assert not at_mask[0, batch["attention_mask"][0].sum() - 1]
    logits = torch.zeros(*ids.shape, len(WORDS))
    assert torch.equal(scored_mask(batch, logits), at_mask)
    bad = tmp_path / "bad.txt"
    bad.write_text("the cat sat\n")
    with pytest.raises(InputError, match=r"line 1.*exactly one \[MASK\], it has 0"):
        read_prompts(str(bad), tok, 8, None, mask_token_id=tok.mask_token_id)


def test_discover_on_a_masked_lm_directory(tiny_bert, tmp_path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"text": "the cat sat on the [MASK]", "target": "mat"},
        {"text": "the [MASK] sat on a mat", "target": "cat"},
        {"text": "a cat [MASK] on the mat", "target": "sat"},
    ]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "run"
    args = ["sweep", "--model", tiny_bert, "--prompts", prompts, "--out", out, "-q"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    swept = json.loads((out / "sweep.json").read_text())
    assert swept["metric"] == "loss"
    names = [u["name"] for u in swept["units"]]
    assert "bert.encoder.layer.1.attention.output.dense@input[heads=1]" in names
    # the same numbers as scoring the masked LM at the mask in Python
    model = transformers.AutoModelForMaskedLM.from_pretrained(tiny_bert, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert, local_files_only=True)
    batches = read_prompts(str(prompts), tok, 32, None, mask_token_id=tok.mask_token_id)
    unit = "bert.encoder.layer.1.attention.output.dense@input[heads=1]"
    means = ma.compute_means(model.eval(), [unit], batches)
    with torch.no_grad():
        clean = model(**{k: batches[0][k] for k in ("input_ids", "attention_mask")}).logits
    at = batches[0]["input_ids"] == tok.mask_token_id
    target = batches[0]["target"][at]
    nll = -clean[at].log_softmax(-1).gather(-1, target[:, None])[:, 0]
    effect = ma.ablation_effect(model, batches[0], unit, means, metric="loss", n_boot=10)
    assert abs(effect.clean - float(nll.double().mean())) < 1e-6
    cli_effect = next(u["effect"] for u in swept["units"] if u["name"] == unit)
    assert abs(cli_effect - effect.value) < 1e-6
