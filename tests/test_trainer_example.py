"""examples/finetune_trainer.py: transformers.Trainer on a patched model (packed batches through
DataCollatorWithFlattening, gradient accumulation, evaluation with compute_metrics), a few steps,
patched and unpatched: on CPU the two runs log the same losses and metrics."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers", minversion="5.0")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra)")

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "finetune_trainer.py"


def _load():
    spec = importlib.util.spec_from_file_location("example_finetune_trainer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_example_runs_and_matches_plain_transformers(capsys):
    ex = _load()
    args = ["--steps", "2", "--eval-steps", "1", "--batch", "4", "--hidden", "32"]
    ours = ex.main(args)
    plain = ex.main(args + ["--no-fasttx"])
    out = capsys.readouterr().out
    assert "fasttx: 2 steps of 2 x 4 sequences" in out and "eval loss" in out
    assert 0.0 <= ours["eval_accuracy"] <= 1.0 and math.isfinite(ours["eval_loss"])
    assert math.isclose(ours["eval_loss"], plain["eval_loss"], rel_tol=1e-5)
    assert math.isclose(ours["eval_accuracy"], plain["eval_accuracy"], rel_tol=1e-6)


def test_packed_batches_have_no_padding():
    ex = _load()
    from transformers import DataCollatorWithFlattening

    batch = DataCollatorWithFlattening()(ex.sequences(3, 5, 9, seed=0)[0])
    assert batch["input_ids"].shape[0] == 1  # one row, the sequences back to back
    assert int((batch["position_ids"][0] == 0).sum()) == 3  # position_ids restart per sequence
    assert int((batch["labels"] == -100).sum()) == 3  # the first token of each sequence predicts nothing
