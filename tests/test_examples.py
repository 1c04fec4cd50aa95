"""Smoke runs of the example scripts: a few optimizer steps each, seconds not minutes."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finetune():
    pytest.importorskip(
        "transformers", minversion="4.48",
        reason="the fine-tuning example needs transformers>=4.48 (the `hf` extra)",
    )
    return _load_script("finetune_bert_classifier")


def _check_result(result, steps):
    assert result["steps"] == steps
    assert result["train_loss"] and all(math.isfinite(x) for x in result["train_loss"])
    assert 0.0 <= result["accuracy"] <= 1.0


def test_dataset_is_shipped_and_labelled(finetune):
    rows = finetune.load_rows(finetune.DEFAULT_DATA)
    assert len(rows) >= 200
    labels = {y for _, y in rows}
    assert labels == {"account", "billing", "shipping", "technical"}
    assert all(text.strip() for text, _ in rows)
    train, test = finetune.split(rows)
    assert len(test) == len(rows) // 5 and not set(train) & set(test)


def test_finetune_from_config_smoke(finetune, capsys, tmp_path):
    result = finetune.main([
        "--max-steps", "3", "--batch-size", "8", "--max-length", "24", "--device", "cpu",
        "--save", str(tmp_path / "out"),
    ])
    _check_result(result, 3)
    printed = capsys.readouterr().out
    assert "attention 'fasttx'" in printed
    assert "epoch 1: train loss" in printed and "held-out accuracy:" in printed
    # The fine-tuned model loads back as an ordinary transformers model.
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert model.config.id2label == {0: "account", 1: "billing", 2: "shipping", 3: "technical"}


def test_finetune_from_local_pretrained_dir(finetune, capsys, tmp_path):
    # What `--model-dir` gets from a downloaded checkpoint, built here without a download: a
    # tiny BERT and a WordPiece tokenizer whose vocabulary is the dataset's words.
    import transformers

    rows = finetune.load_rows(finetune.DEFAULT_DATA)
    words = sorted({w for text, _ in rows for w in finetune.WordTokenizer.split(text)})
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tokenizer = transformers.BertTokenizer(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
    )
    pretrained = tmp_path / "pretrained"
    transformers.BertForSequenceClassification(config).save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)

    result = finetune.main([
        "--model-dir", str(pretrained), "--max-steps", "2", "--batch-size", "8",
        "--max-length", "24", "--device", "cpu",
    ])
    _check_result(result, 2)
    printed = capsys.readouterr().out
    assert "attention 'fasttx'" in printed and "held-out accuracy:" in printed


def test_finetune_rejects_bad_csv(finetune, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,category\nhello,billing\n")
    with pytest.raises(ValueError, match="columns 'text' and 'label'"):
        finetune.main(["--data", str(bad), "--max-steps", "1"])
