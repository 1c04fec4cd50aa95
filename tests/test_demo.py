"""python -m fasttx.demo: a tiny end-to-end run through main(argv) (training, early stopping,
checkpoint save and safe load, sampling), --compare, --help, and clear errors for bad flags and
bad corpus paths."""
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from fasttx import demo
from fasttx.models import GPT, GPTConfig

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--steps", "4", "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "12",
        "--warmup", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    # a few kilobytes of the shipped corpus keep the run fast
    with open(demo.DEFAULT_CORPUS, encoding="utf-8") as f:
        text = f.read(20_000)
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_shipped_corpus_and_its_source():
    with open(demo.DEFAULT_CORPUS, encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("PRIDE AND PREJUDICE") and len(text) < 2_000_000
    assert "Gutenberg" not in text
    source = open(os.path.join(os.path.dirname(demo.DEFAULT_CORPUS), "SOURCE.md"), encoding="utf-8").read()
    assert "public domain" in source.lower() and "r-cran-janeaustenr" in source


def test_tiny_run_end_to_end(tmp_path, corpus, capsys):
    ckpt = tmp_path / "out" / "ckpt.pt"
    threads = torch.get_num_threads()
    assert demo.main(TINY + ["--data", corpus, "--checkpoint", str(ckpt)]) == 0
    assert torch.get_num_threads() == threads  # restored
    out = capsys.readouterr().out
    assert "device: cpu (fp32); fasttx backend: torch" in out
    assert "loaded back with weights_only=True" in out
    assert out.count("--- sample (prompt") == len(demo.PROMPTS)
    assert "fasttx step 4: loss" in out  # plain progress lines with loss and tokens/s
    assert "tok/s" in out
    # The checkpoint is a plain-data dict that the safe loader accepts and that rebuilds the model.
    payload = torch.load(ckpt, weights_only=True)
    assert set(payload) == {"model", "config", "alphabet", "step", "val_loss"}
    model = GPT(GPTConfig(**payload["config"]))
    model.load_state_dict(payload["model"])
    assert model.config.n_layer == 1 and model.config.vocab_size == len(payload["alphabet"])
    assert math.isfinite(payload["val_loss"])
    assert not os.path.exists(str(ckpt) + ".tmp")


def test_tqdm_is_optional(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` raises ImportError
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    argv = [a for a in TINY if a != "--no-progress"] + ["--data", corpus, "--sample-tokens", "0",
                                                        "--checkpoint", str(tmp_path / "c.pt")]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "fasttx step 4: loss" in out and "--- sample" not in out


def test_compare(tmp_path, corpus, capsys):
    argv = TINY + ["--data", corpus, "--compare", "--sample-tokens", "0", "--checkpoint", str(tmp_path / "c.pt")]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "[torch.nn] step 0: val loss" in out
    assert "tokens/s: fasttx" in out and "vs torch.nn" in out


def test_early_stopping(tmp_path, corpus, capsys):
    # lr 1e-9: the validation loss cannot improve after the first evaluation
    argv = TINY + ["--data", corpus, "--steps", "50", "--eval-interval", "1", "--patience", "2",
                   "--lr", "1e-9", "--min-lr", "0", "--sample-tokens", "0", "--checkpoint", str(tmp_path / "c.pt")]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "early stopping: no better validation loss in 2 evaluations" in out
    assert "fasttx step 50" not in out


def test_learning_rate_schedule():
    args = SimpleNamespace(lr=1.0, min_lr=0.1, warmup=10, steps=110, time_limit=0)
    assert demo.lr_at(0, args) == pytest.approx(0.1)
    assert demo.lr_at(9, args) == pytest.approx(1.0)  # end of the linear warmup
    assert demo.lr_at(60, args) == pytest.approx(0.55)  # half-way down the cosine
    assert demo.lr_at(110, args) == pytest.approx(0.1)
    lrs = [demo.lr_at(s, args) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    args.time_limit = 100.0  # the clock is further along than the steps: it drives the decay
    assert demo.lr_at(20, args, elapsed=100.0) == pytest.approx(0.1)


def test_tokenizer_round_trip():
    tok = demo.CharTokenizer.from_text("hello world")
    assert tok.vocab_size == 8 and tok.alphabet == " dehlorw"
    assert tok.decode(tok.encode("low hello")) == "low hello"


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--steps", "--n-layer", "--n-embd", "--device", "--compare", "--data", "--checkpoint"):
        assert flag in out


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps: expected a positive integer, got 0"),
    (["--steps", "ten"], "--steps: expected a positive integer, got 'ten'"),
    (["--lr", "-1"], "--lr: expected a positive number"),
    (["--dropout", "1"], r"--dropout: expected a number in \[0.0, 1.0\)"),
    (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--n-embd", "30", "--n-head", "4"], r"--n-embd \(30\) must be divisible by --n-head \(4\)"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], r"--min-lr \(0.001\) must not exceed --lr"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_cuda_requested_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: --device cuda is valid here")
    with pytest.raises(SystemExit):
        demo.main(["--device", "cuda"])
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


def test_missing_corpus(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--data", str(tmp_path / "nope.txt")])
    assert e.value.code == 2
    assert "--data: corpus file not found:" in capsys.readouterr().err


def test_corpus_is_a_directory(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--data", str(tmp_path)])
    assert "corpus path is a directory" in capsys.readouterr().err


def test_corpus_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(SystemExit):
        demo.main(["--data", str(path)])
    assert "corpus file is not UTF-8 text" in capsys.readouterr().err


def test_corpus_unreadable(tmp_path, capsys, monkeypatch):
    # chmod 000 does not stop root, so make open() itself refuse, as it does for a normal user
    path = tmp_path / "secret.txt"
    path.write_text("x" * 1000)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(demo, "open", refuse, raising=False)
    with pytest.raises(SystemExit):
        demo.main(["--data", str(path)])
    assert "corpus file is not readable (permission denied)" in capsys.readouterr().err


def test_corpus_too_short(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("too short for any context")
    with pytest.raises(SystemExit):
        demo.main(["--data", str(path), "--block-size", "64"])
    assert "corpus too short" in capsys.readouterr().err
