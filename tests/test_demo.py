"""python -m fasttx.demo: a tiny end-to-end run through main(argv) (training, early stopping,
checkpoint save and safe load, sampling), --compare, --help, and clear errors for bad flags and
bad corpus paths."""
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import fasttx
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
    assert "device: cpu (fp32); fasttx backend: torch - torch's own ops" in out
    # the header says that the run can stop before --steps
    assert "training: up to 4 steps or 200 s, whichever comes first, of 4 x 16 tokens" in out
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


def test_llama_preset(tmp_path, corpus, capsys):
    ckpt = tmp_path / "llama.pt"
    argv = TINY + ["--data", corpus, "--preset", "llama", "--sample-tokens", "8", "--checkpoint", str(ckpt)]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "model: GPT (llama: rmsnorm, rotary positions, swiglu MLP, 1 kv heads)" in out
    assert out.count("--- sample (prompt") == len(demo.PROMPTS)
    model, _, _ = demo.load_checkpoint(str(ckpt), "cpu")  # the checkpoint rebuilds the Llama-style model
    assert model.config.norm == "rmsnorm" and model.config.n_kv_head == 1 and not model.config.tie_weights


def test_moe_preset(tmp_path, corpus, capsys):
    ckpt = tmp_path / "moe.pt"
    argv = TINY + ["--data", corpus, "--preset", "moe", "--sample-tokens", "4", "--checkpoint", str(ckpt)]
    assert demo.main(argv) == 0
    model, _, _ = demo.load_checkpoint(str(ckpt), "cpu")  # the checkpoint rebuilds the MoE model
    assert model.config.n_experts == 4 and type(model.transformer.h[0].mlp).__name__ == "MoE"


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
    assert "[torch] step 0: val loss" in out
    assert "tokens/s: fasttx" in out and "vs torch" in out


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


def test_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--steps", "--n-layer", "--n-embd", "--device", "--backend", "--compare", "--data", "--checkpoint"):
        assert flag in out
    lines = {}  # option -> its help entry on one line (a long option puts its help on the next)
    for line in out.splitlines():
        if line.startswith("  --"):
            key = line.split()[0]
            lines[key] = line
        elif line.startswith("      ") and lines:
            lines[key] += " " + line.strip()
    for action in demo.build_parser()._actions:
        if not action.option_strings or action.option_strings[0] == "-h":
            continue
        line = lines[action.option_strings[0]]
        assert action.help, f"{action.option_strings[0]} has no help"
        if action.default is not None and action.default is not False:
            # every default shown, once (the --data default used to appear twice)
            assert line.count("default") == 1, line
        if action.option_strings[0] != "--data" and action.default not in (None, False):
            assert f"(default: {action.default})" in line, line
    assert "(default: the bundled Pride and Prejudice" in lines["--data"]
    assert "(default: all)" in lines["--top-k"]


def test_backend_flag(tmp_path, corpus, capsys, monkeypatch):
    common = TINY + ["--data", corpus, "--sample-tokens", "0", "--checkpoint", str(tmp_path / "c.pt")]
    # the Triton kernels (here through the interpreter that tests/conftest.py switches on)
    assert demo.main(common + ["--backend", "triton", "--steps", "2", "--eval-interval", "1"]) == 0
    out = capsys.readouterr().out
    assert "fasttx backend: triton - Triton kernels [fasttx.use_backend = 'triton']" in out
    assert fasttx.get_backend() == "auto"  # restored after the run
    with pytest.raises(SystemExit) as e:
        demo.main(["--backend", "jax"])
    assert e.value.code == 2
    assert "--backend: invalid choice: 'jax'" in capsys.readouterr().err
    if not torch.cuda.is_available():  # without a GPU nor the interpreter: a clear refusal
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(SystemExit):
            demo.main(common + ["--backend", "triton"])
        assert "--backend triton: the kernels need a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps: expected a positive integer, got 0"),
    (["--steps", "ten"], "--steps: expected a positive integer, got 'ten'"),
    (["--lr", "-1"], "--lr: expected a positive number"),
    (["--dropout", "1"], r"--dropout: expected a number in \[0.0, 1.0\)"),
    (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--n-embd", "30", "--n-head", "4"], r"--n-embd \(30\) must be divisible by --n-head \(4\)"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], r"--min-lr \(0.001\) must not exceed --lr"),
    (["--n-head", "4", "--n-kv-head", "3"], r"--n-head \(4\) must be a multiple of --n-kv-head \(3\)"),
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


# The README's "Train a GPT" snippet, read from README.md: it must run in well under 20 s on one CPU
# core, print the loss as it falls and end with readable decoded text (tests/test_readme.py runs
# every snippet; this one checks what it shows).
def _readme_gpt_snippet() -> str:
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```python\n(.*?)^```", readme, flags=re.S | re.M)
    return next(b for b in blocks if "from fasttx.models import GPT" in b and "pride_and_prejudice" in b)


def test_readme_gpt_snippet(capsys):
    import re

    exec(compile(_readme_gpt_snippet(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    losses = [float(v) for v in re.findall(r"^step \d+: loss (\d+\.\d+)$", out, re.M)]
    assert len(losses) == 7
    assert losses[0] == pytest.approx(math.log(80), abs=0.5)  # chance over the corpus' ~80 characters
    assert losses[-1] < losses[0] - 1.5 and losses[-1] < 2.4, losses  # it learns
    sample = out.split("loss")[-1].split("\n", 1)[1]
    assert sample.startswith("Elizabeth") and len(sample) > 150
    assert all(c.isprintable() or c == "\n" for c in sample)
    words = re.findall(r"[a-z]+", sample.lower())
    assert sum(w in ("the", "and", "her", "of", "to", "he", "she", "a") for w in words) >= 3, sample
