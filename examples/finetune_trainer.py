"""Fine-tune a small causal LM with transformers.Trainer on a patched model.

    python examples/finetune_trainer.py                 # 60 steps: about 2 minutes on a 2-core CPU
    python examples/finetune_trainer.py --no-fasttx     # the same run on plain transformers
    python examples/finetune_trainer.py --steps 4 --eval-steps 2 --hidden 32   # a smoke run

The model is a 2-layer Llama built from a config (byte-level: 256 tokens, no tokenizer, nothing
downloaded) and patched by `apply_fasttx`. The data are passages of Pride and Prejudice (shipped in
fasttx/data) cut into sequences of varied lengths. Everything the Trainer path needs is exercised:
  - DataCollatorWithFlattening packs each batch into one row without padding (position_ids restart
    at every sequence; the patched attention runs it as varlen attention, each sequence attending
    only within itself);
  - gradient accumulation (the loss normalised by the number of tokens across micro-batches,
    `num_items_in_batch`, as transformers' own loss does);
  - evaluation with compute_metrics (next-byte accuracy), which reads the logits: a patched model
    skips them only while training with labels, so evaluation gets them as usual.
Prints the evaluation loss and accuracy at every evaluation and the wall time.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

TEXT = Path(__file__).resolve().parent.parent / "fasttx" / "data" / "pride_and_prejudice.txt"


def sequences(n: int, lo: int, hi: int, seed: int, offset: int = 0):
    """n byte sequences of lengths in [lo, hi] from the novel, consecutive from `offset`."""
    data = TEXT.read_bytes()
    rng = random.Random(seed)
    out, pos = [], offset
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = list(data[pos:pos + length])
        pos += length
        out.append({"input_ids": ids, "labels": list(ids)})
    return out, pos


def preprocess_logits_for_metrics(logits, labels):
    return logits.argmax(-1)  # keep (B, L) predictions, not (B, L, 256) logits, across eval batches


def compute_metrics(pred):
    preds, labels = pred.predictions, pred.label_ids  # the flattened rows: (1, total) each
    preds, labels = preds[..., :-1], labels[..., 1:]  # token t predicts t + 1; -100 starts a sequence
    keep = labels != -100
    return {"accuracy": float((preds[keep] == labels[keep]).mean())}


def build(args):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config)
    if not args.no_fasttx:
        from fasttx.integrations.huggingface import apply_fasttx

        model = apply_fasttx(model)
    return model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fasttx", action="store_true", help="plain transformers, for comparison")
    p.add_argument("--output-dir", default=None, help="Trainer's output dir (default: a temporary one)")
    args = p.parse_args(argv)

    import tempfile

    import transformers
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    transformers.set_seed(args.seed)
    train, end = sequences(args.steps * args.batch * args.accumulate, 24, 96, args.seed)
    evaluation, _ = sequences(32, 24, 96, args.seed + 1, offset=end)
    model = build(args)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=args.output_dir or tmp, max_steps=args.steps, per_device_train_batch_size=args.batch,
            per_device_eval_batch_size=16, gradient_accumulation_steps=args.accumulate, learning_rate=args.lr,
            lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10), eval_strategy="steps",
            eval_steps=args.eval_steps, logging_steps=args.eval_steps, save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(), seed=args.seed, data_seed=args.seed, disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model, args=targs, train_dataset=train, eval_dataset=evaluation,
            data_collator=DataCollatorWithFlattening(), compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        start = time.time()
        trainer.train()
        metrics = trainer.evaluate()
    evals = {h["step"]: h for h in trainer.state.log_history if "eval_loss" in h}.values()  # one per step
    for h in evals:
        print(f"step {h['step']:4d}  eval loss {h['eval_loss']:.4f}  accuracy {h['eval_accuracy']:.3f}")
    which = "plain transformers" if args.no_fasttx else "fasttx"
    print(f"{which}: {args.steps} steps of {args.accumulate} x {args.batch} sequences in {time.time() - start:.1f} s; "
          f"final eval loss {metrics['eval_loss']:.4f}, accuracy {metrics['eval_accuracy']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
