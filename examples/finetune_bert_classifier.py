"""Fine-tune a small BERT-style classifier with fasttx on a business text-classification task.

The data (examples/data/support_tickets.csv) is 300 short customer-support tickets labelled
billing / shipping / technical / account; every 5th row is held out for evaluation.

    python examples/finetune_bert_classifier.py                    # tiny BERT from a config, no downloads
    python examples/finetune_bert_classifier.py --model-dir DIR    # a local pretrained model + tokenizer
    python examples/finetune_bert_classifier.py --backend triton   # force the Triton kernels

Without --model-dir the model is a 2-layer BERT built from a config with a word-level vocabulary
taken from the training split, so the script runs anywhere in seconds. With --model-dir, DIR is what
`save_pretrained` wrote for a model and its tokenizer (e.g. a downloaded bert-base-uncased); its
classification head is resized to the four labels. Either way `apply_fasttx` swaps in fasttx's
LayerNorm, GELU, dropout and attention; the weights and state_dict are untouched, so the fine-tuned
model saves (--save DIR) and loads as an ordinary transformers model.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import fasttx
from fasttx.integrations.huggingface import apply_fasttx

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "support_tickets.csv"


def load_rows(path: Path) -> List[Tuple[str, str]]:
    """(text, label) pairs from a CSV with a header `text,label`."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a CSV header with columns 'text' and 'label'")
        return [(row["text"], row["label"]) for row in reader]


def split(rows: Sequence, held_out_every: int = 5):
    """Deterministic split: every `held_out_every`-th row is held out."""
    train = [r for i, r in enumerate(rows) if i % held_out_every != 0]
    test = [r for i, r in enumerate(rows) if i % held_out_every == 0]
    return train, test


class WordTokenizer:
    """Lower-cased word-level tokenizer with a vocabulary built from the training texts: enough for
    a model trained from scratch, and needs no download."""

    PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"

    def __init__(self, texts: Sequence[str]):
        words = sorted({w for t in texts for w in self.split(t)})
        self.vocab = {tok: i for i, tok in enumerate([self.PAD, self.UNK, self.CLS] + words)}

    @staticmethod
    def split(text: str) -> List[str]:
        return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())

    def __call__(self, texts: Sequence[str], max_length: int) -> Dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)  # (B, T), [PAD] = 0
        mask = torch.zeros(len(texts), max_length, dtype=torch.long)
        for b, text in enumerate(texts):
            toks = [self.CLS] + self.split(text)
            row = [self.vocab.get(t, self.vocab[self.UNK]) for t in toks][:max_length]
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def build_model(args, labels: List[str], train_texts: List[str]):
    """(model, encode) where encode(texts) -> dict of (B, T) tensors for the model."""
    from transformers import BertConfig, BertForSequenceClassification

    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    if args.model_dir:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model_dir, num_labels=len(labels), id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=True,  # a new classification head for our labels
        )

        def encode(texts):
            enc = tokenizer(list(texts), padding="max_length", truncation=True,
                            max_length=args.max_length, return_tensors="pt")
            return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

        return model, encode

    tokenizer = WordTokenizer(train_texts)
    config = BertConfig(
        vocab_size=len(tokenizer.vocab), hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
        max_position_embeddings=max(64, args.max_length), num_labels=len(labels),
        id2label=id2label, label2id=label2id, pad_token_id=0,
    )
    return BertForSequenceClassification(config), lambda texts: tokenizer(texts, args.max_length)


@torch.no_grad()
def evaluate(model, encode, rows, label2id, device, batch_size) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: v.to(device) for k, v in encode([t for t, _ in chunk]).items()}
        pred = model(**batch).logits.argmax(-1).cpu()  # (B,)
        correct += int((pred == torch.tensor([label2id[y] for _, y in chunk])).sum())
    return correct / max(1, len(rows))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV with columns text,label")
    p.add_argument("--model-dir", default=None, help="local pretrained model + tokenizer directory")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 from scratch, 5e-5 pretrained")
    p.add_argument("--max-length", type=int, default=32, help="tokens per ticket (padded/truncated)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the from-config model")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=fasttx.BACKENDS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save", default=None, help="save the fine-tuned model here (save_pretrained)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rows = load_rows(args.data)
    train_rows, test_rows = split(rows)
    labels = sorted({y for _, y in rows})
    label2id = {y: i for i, y in enumerate(labels)}
    lr = args.lr if args.lr is not None else (5e-5 if args.model_dir else 1e-3)

    with fasttx.use_backend(args.backend):
        model, encode = build_model(args, labels, [t for t, _ in train_rows])
        model = apply_fasttx(model).to(args.device)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{type(model).__name__}: {n_params / 1e6:.2f}M parameters, attention "
              f"{model.config._attn_implementation!r}, backend {args.backend!r} on {args.device}; "
              f"{len(train_rows)} train / {len(test_rows)} held-out tickets, labels {labels}")

        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        order = torch.Generator().manual_seed(args.seed)
        step, losses, t0 = 0, [], time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            model.train()
            epoch_losses = []
            for idx in torch.randperm(len(train_rows), generator=order).split(args.batch_size):
                chunk = [train_rows[i] for i in idx.tolist()]
                batch = {k: v.to(args.device) for k, v in encode([t for t, _ in chunk]).items()}
                targets = torch.tensor([label2id[y] for _, y in chunk], device=args.device)
                loss = model(**batch, labels=targets).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                epoch_losses.append(loss.item())
                step += 1
                if args.max_steps is not None and step >= args.max_steps:
                    break
            losses.append(sum(epoch_losses) / len(epoch_losses))
            print(f"epoch {epoch}: train loss {losses[-1]:.4f} ({step} steps, "
                  f"{time.perf_counter() - t0:.1f}s)")
            if args.max_steps is not None and step >= args.max_steps:
                break

        accuracy = evaluate(model, encode, test_rows, label2id, args.device, args.batch_size)
        print(f"held-out accuracy: {accuracy:.3f} ({round(accuracy * len(test_rows))}/{len(test_rows)})")
        if args.save:
            model.save_pretrained(args.save)
            print(f"saved to {args.save}")
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"training diverged: losses {losses}")
    return {"train_loss": losses, "accuracy": accuracy, "steps": step}


if __name__ == "__main__":
    main()
