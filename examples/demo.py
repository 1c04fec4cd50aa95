"""`make demo` / `python examples/demo.py` (or `python -m fasttx.demo` from a checkout): train a
small character-level GPT on Jane Austen.

Trains fasttx.models.GPT on the corpus shipped in fasttx/data (Pride and Prejudice, public domain;
see fasttx/data/SOURCE.md) with AdamW + weight decay, linear warmup then cosine decay, gradient
clipping, a held-out validation split with early stopping, and a checkpoint saved and loaded back
with `torch.load(weights_only=True)`; then prints samples of generated text.

On CUDA the Triton kernels run under bf16 autocast; on CPU torch's own ops (`--backend` chooses).
The defaults finish in a few minutes on a 2-core CPU (training stops at --steps, --time-limit or by
early stopping, whichever comes first). `--compare` trains the same model again on fasttx's torch
path and prints both throughputs. `--help` lists every flag with its default.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence

import torch

import fasttx

# the corpus ships with the library (package data, fasttx/data), the CLI lives here in examples/
DEFAULT_CORPUS = os.path.join(os.path.dirname(os.path.abspath(fasttx.__file__)), "data", "pride_and_prejudice.txt")
DEFAULT_CHECKPOINT = os.path.join(tempfile.gettempdir(), "fasttx-demo", "gpt_char.pt")
PROMPTS = ("\n", "It is a truth", "Elizabeth")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _fraction(low: float, high: float, high_open: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low <= value < high if high_open else low <= value <= high):
            bracket = ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"expected a number in [{low}, {high}{bracket}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's default at the end of its help, once; none for flags and for options whose
    help already says what their absence means."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


BACKEND_CHOICES = ("auto", "triton", "torch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python examples/demo.py",
        description="Train a small character-level GPT (fasttx.models.GPT) on Pride and Prejudice, "
        "save and reload a checkpoint, and print generated text. Training stops at --steps, at "
        "--time-limit or by early stopping, whichever comes first.",
        formatter_class=_HelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", default=DEFAULT_CORPUS, metavar="PATH",
                      help="UTF-8 text file to train on (default: the bundled Pride and Prejudice, "
                      "fasttx/data/pride_and_prejudice.txt)")
    data.add_argument("--val-fraction", type=_fraction(0.01, 0.5), default=0.1, metavar="F",
                      help="fraction of the text, taken from its end, held out for validation")

    model = p.add_argument_group("model")
    model.add_argument("--n-layer", type=_positive_int, default=3, metavar="N", help="transformer blocks")
    model.add_argument("--n-head", type=_positive_int, default=4, metavar="N", help="attention heads")
    model.add_argument("--n-embd", type=_positive_int, default=96, metavar="N",
                       help="embedding width (a multiple of --n-head)")
    model.add_argument("--block-size", type=_positive_int, default=64, metavar="N",
                       help="context length in characters")
    model.add_argument("--dropout", type=_fraction(0.0, 1.0), default=0.0, metavar="P",
                       help="embedding, attention and residual dropout")
    model.add_argument("--preset", choices=("gpt2", "llama", "moe"), default="gpt2",
                       help="architecture: gpt2 = LayerNorm, learned positions, GELU MLP, tied head; "
                       "llama = RMSNorm, rotary, SwiGLU, grouped-query attention, untied head, no biases; "
                       "moe = llama with a mixture of 4 SwiGLU experts (top-2) in every block")
    model.add_argument("--pos-encoding", choices=("learned", "sinusoidal", "rotary"), default=None,
                       help="position embedding (default: the preset's, learned or rotary)")
    model.add_argument("--n-kv-head", type=_positive_int, default=None, metavar="N",
                       help="key/value heads, dividing --n-head (default: --n-head for gpt2, half of it for llama)")

    train = p.add_argument_group("training")
    train.add_argument("--steps", type=_positive_int, default=2000, metavar="N",
                       help="maximum optimizer steps (the run may stop sooner: --time-limit, --patience)")
    train.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="sequences per step")
    train.add_argument("--lr", type=_positive_float, default=3e-3, help="peak learning rate")
    train.add_argument("--min-lr", type=_fraction(0.0, math.inf), default=3e-4, metavar="LR",
                       help="learning rate at the end of the cosine decay")
    train.add_argument("--warmup", type=_non_negative_int, default=50, metavar="N", help="linear warmup steps")
    train.add_argument("--weight-decay", type=_fraction(0.0, math.inf), default=0.1, metavar="W",
                       help="AdamW weight decay of the matrices (biases and norms are not decayed)")
    train.add_argument("--grad-clip", type=_fraction(0.0, math.inf), default=1.0, metavar="NORM",
                       help="max global gradient norm (0 disables clipping)")
    train.add_argument("--eval-interval", type=_positive_int, default=100, metavar="N",
                       help="steps between validations")
    train.add_argument("--eval-iters", type=_positive_int, default=10, metavar="N",
                       help="validation batches per evaluation")
    train.add_argument("--patience", type=_positive_int, default=3, metavar="N",
                       help="early stopping: evaluations without a better validation loss before stopping")
    train.add_argument("--time-limit", type=_fraction(0.0, math.inf), default=200.0, metavar="SECONDS",
                       help="stop training after this many seconds (0: no limit); the cosine decay "
                       "follows whichever of --steps and --time-limit runs out first")
    train.add_argument("--seed", type=int, default=1337, help="seed of the weights, batches and samples")

    run = p.add_argument_group("run")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto: CUDA when available (bf16 autocast), else CPU")
    run.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                     help="fasttx's path (fasttx.use_backend): auto = Triton kernels for CUDA tensors, "
                     "torch's own ops otherwise; triton = always the kernels (on CPU only under "
                     "TRITON_INTERPRET=1, very slow); torch = always torch's ops")
    run.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                     help="CPU threads for torch: the demo's small matrices gain little from more, "
                     "and spinning threads slow to a crawl on a busy machine")
    run.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, metavar="PATH",
                     help="where the best model is saved (and loaded back from before sampling)")
    run.add_argument("--sample-tokens", type=_non_negative_int, default=300, metavar="N",
                     help="characters generated per sample (0: no samples)")
    run.add_argument("--temperature", type=_fraction(0.0, math.inf), default=0.8, metavar="T",
                     help="sampling temperature (0: greedy)")
    run.add_argument("--top-k", type=_positive_int, default=None, metavar="K",
                     help="sample only among the K most likely characters (default: all)")
    run.add_argument("--compare", action="store_true",
                     help="also train the same model on fasttx's torch path (torch's own ops) and "
                     "print both tokens/s")
    run.add_argument("--no-progress", action="store_true", help="plain progress lines instead of a bar")
    return p


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
class CharTokenizer:
    """One token per character of the corpus' alphabet (sorted, so the ids are reproducible)."""

    def __init__(self, alphabet: str):
        self.alphabet = alphabet
        self.stoi = {c: i for i, c in enumerate(alphabet)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> List[int]:
        return [self.stoi[c] for c in text if c in self.stoi]  # unknown characters are dropped

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)


def read_corpus(path: str, parser: argparse.ArgumentParser) -> str:
    """The corpus text; a clear command-line error (SystemExit) when it cannot be used."""
    if not os.path.exists(path):
        parser.error(f"--data: corpus file not found: {path}")
    if os.path.isdir(path):
        parser.error(f"--data: corpus path is a directory, not a text file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except PermissionError:
        parser.error(f"--data: corpus file is not readable (permission denied): {path}")
    except UnicodeDecodeError as e:
        parser.error(f"--data: corpus file is not UTF-8 text ({e.reason} at byte {e.start}): {path}")
    except OSError as e:
        parser.error(f"--data: cannot read corpus file {path}: {e.strerror or e}")
    return text


def get_batch(data: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator, device):
    """Random windows: x (B, T) and the next-character targets y (B, T)."""
    starts = torch.randint(0, data.numel() - block_size - 1, (batch_size,), generator=generator)
    offsets = starts[:, None] + torch.arange(block_size + 1)  # (B, T + 1)
    chunk = data[offsets]
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def lr_at(step: int, args, elapsed: float = 0.0) -> float:
    """Linear warmup to args.lr over args.warmup steps, then cosine decay to args.min_lr. The decay
    follows whichever budget is further spent, steps or --time-limit seconds, so a run cut short by
    the clock still ends on a low learning rate."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    if args.time_limit > 0:
        progress = max(progress, elapsed / args.time_limit)
    progress = min(1.0, progress)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


@torch.no_grad()
def evaluate(model, batches, autocast) -> float:
    model.eval()
    losses = []
    for x, y in batches:
        with autocast():
            _, loss = model(x, y)
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


class Progress:
    """A tqdm bar when tqdm is installed (the optional `demo` extra) and stderr is a terminal, else
    a plain line every 5% of the steps (readable in logs and CI)."""

    def __init__(self, total: int, label: str, plain: bool):
        self.bar = None
        self.label = label
        self.every = max(1, total // 20)
        if not plain and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=label, unit="step", dynamic_ncols=True)

    def update(self, step: int, stats: Dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(stats, refresh=False)
        elif (step + 1) % self.every == 0:
            print(f"{self.label} step {step + 1}: " + ", ".join(f"{k} {v}" for k, v in stats.items()), flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def save_checkpoint(path: str, model, tokenizer: CharTokenizer, step: int, val_loss: float) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "model": state,
        "config": asdict(model.config),
        "alphabet": tokenizer.alphabet,
        "step": step,
        "val_loss": val_loss,
    }
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def load_checkpoint(path: str, device):
    """(model, tokenizer, payload) from a checkpoint, read with weights_only=True (no pickled code)."""
    from fasttx.models import GPT, GPTConfig

    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**payload["config"]))
    model.load_state_dict(payload["model"])
    return model.to(device), CharTokenizer(payload["alphabet"]), payload


def train(model, args, train_data, val_batches, device, autocast, label: str, tokenizer=None):
    """Train in place; returns a dict of statistics. Saves the best model when a tokenizer is given."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = model.configure_optimizers(args.weight_decay, args.lr, betas=(0.9, 0.99), device_type=device.type)
    tokens_per_step = args.batch_size * args.block_size
    progress = Progress(args.steps, label, args.no_progress)
    best, best_step, bad_evals = math.inf, 0, 0
    history = []
    first_val = evaluate(model, val_batches, autocast)
    history.append((0, first_val))
    progress.write(f"[{label}] step 0: val loss {first_val:.3f}")
    train_time, steps_done, stopped_early = 0.0, 0, False
    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        t0 = time.perf_counter()
        elapsed = t0 - started  # evaluations included: the budget is the user's wall time
        lr = lr_at(step, args, elapsed)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, args.block_size, args.batch_size, gen, device)
        with autocast():
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        loss_value = loss.item()  # also waits for the GPU, so the timing below is honest
        train_time += time.perf_counter() - t0
        steps_done += 1
        progress.update(step, {"loss": f"{loss_value:.3f}", "lr": f"{lr:.1e}",
                               "tok/s": f"{steps_done * tokens_per_step / train_time:,.0f}"})
        out_of_time = args.time_limit > 0 and time.perf_counter() - started >= args.time_limit
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps or out_of_time:
            val = evaluate(model, val_batches, autocast)
            history.append((step + 1, val))
            mark = ""
            if val < best - 1e-4:
                best, best_step, bad_evals = val, step + 1, 0
                if tokenizer is not None:
                    save_checkpoint(args.checkpoint, model, tokenizer, step + 1, val)
                mark = " (best, saved)" if tokenizer is not None else " (best)"
            else:
                bad_evals += 1
            progress.write(f"[{label}] step {step + 1}: train loss {loss_value:.3f}, val loss {val:.3f}{mark}")
            if bad_evals >= args.patience:
                progress.write(f"[{label}] early stopping: no better validation loss in {args.patience} evaluations")
                stopped_early = True
                break
        if out_of_time:
            progress.write(f"[{label}] --time-limit {args.time_limit:g} s reached after {step + 1} steps")
            break
    progress.close()
    return {
        "tokens_per_s": steps_done * tokens_per_step / max(train_time, 1e-9),
        "steps": steps_done,
        "first_val": first_val,
        "best_val": best,
        "best_step": best_step,
        "history": history,
        "stopped_early": stopped_early,
    }


# ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n_embd % args.n_head != 0:
        parser.error(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    if args.n_kv_head is not None and args.n_head % args.n_kv_head != 0:
        parser.error(f"--n-head ({args.n_head}) must be a multiple of --n-kv-head ({args.n_kv_head})")
    if args.min_lr > args.lr:
        parser.error(f"--min-lr ({args.min_lr}) must not exceed --lr ({args.lr})")
    if args.warmup >= args.steps:
        shorter = args.steps // 10
        print(f"note: --warmup {args.warmup} is not shorter than --steps {args.steps}; using {shorter}")
        args.warmup = shorter
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu or auto)")
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.backend == "triton" and not on_cuda:
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            parser.error("--backend triton: triton is not installed (it is available on Linux only)")
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            parser.error("--backend triton: the kernels need a CUDA device; on CPU they run only through "
                         "the Triton interpreter (set TRITON_INTERPRET=1, very slow), or use --backend auto")

    text = read_corpus(args.data, parser)
    import fasttx

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with fasttx.use_backend(args.backend):
            return _run(args, parser, text)
    finally:
        torch.set_num_threads(threads)  # main() may be called from a larger program (or a test)


def _run(args, parser, text: str) -> int:
    tokenizer = CharTokenizer.from_text(text)
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)  # (N,)
    n_val = int(len(data) * args.val_fraction)
    train_data, val_data = data[: len(data) - n_val], data[len(data) - n_val:]
    if min(len(train_data), len(val_data)) <= args.block_size + 1:
        parser.error(
            f"--data: corpus too short ({len(text)} characters) for --block-size {args.block_size} "
            f"with --val-fraction {args.val_fraction}"
        )

    import fasttx
    from fasttx._backend import use_triton
    from fasttx.models import GPT, GPTConfig

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda":
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        precision = "bf16 autocast"
    else:
        autocast = contextlib.nullcontext
        precision = "fp32"

    fields = dict(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                  n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, n_kv_head=args.n_kv_head)
    if args.pos_encoding is not None:
        fields["pos_encoding"] = args.pos_encoding
    if args.preset in ("llama", "moe"):
        if args.n_kv_head is None and args.n_head % 2 == 0:
            fields["n_kv_head"] = args.n_head // 2
        if args.preset == "moe":
            fields.update(n_experts=4, moe_top_k=2)
        config = GPTConfig.llama(**fields)
    else:
        config = GPTConfig(**fields)
    torch.manual_seed(args.seed)
    model = GPT(config).to(device)
    backend = "triton" if use_triton(model.lm_head.weight) else "torch"
    what = "Triton kernels" if backend == "triton" else "torch's own ops"
    print(f"corpus: {args.data} ({len(text):,} characters, {tokenizer.vocab_size} distinct; "
          f"{len(train_data):,} train / {len(val_data):,} validation)")
    print(f"device: {device} ({precision}); fasttx backend: {backend} - {what} "
          f"[fasttx.use_backend = {fasttx.get_backend()!r}]")
    print(f"model: GPT ({args.preset}: {config.norm}, {config.pos_encoding} positions, {config.mlp} MLP, "
          f"{config.kv_heads} kv heads) {args.n_layer} layers, {args.n_head} heads, n_embd {args.n_embd}, context "
          f"{args.block_size}, {model.num_params():,} parameters")
    limit = f" or {args.time_limit:g} s, whichever comes first," if args.time_limit > 0 else ""
    print(f"training: up to {args.steps} steps{limit} of {args.batch_size} x {args.block_size} tokens; "
          f"early stopping after {args.patience} validations without improvement")

    vgen = torch.Generator().manual_seed(args.seed)
    val_batches = [get_batch(val_data, args.block_size, args.batch_size, vgen, device) for _ in range(args.eval_iters)]

    started = time.perf_counter()
    stats = train(model, args, train_data, val_batches, device, autocast, "fasttx", tokenizer)
    print(f"validation loss {stats['first_val']:.3f} -> {stats['best_val']:.3f} (best, step "
          f"{stats['best_step']}); {stats['tokens_per_s']:,.0f} tokens/s; training took "
          f"{time.perf_counter() - started:.0f} s")

    # Load the best model back from disk, the safe way, and sample from it.
    if not os.path.exists(args.checkpoint):
        raise RuntimeError(f"no checkpoint was written to {args.checkpoint} (validation never improved)")
    loaded, tok2, payload = load_checkpoint(args.checkpoint, device)
    loaded.eval()
    val_again = evaluate(loaded, val_batches, autocast)
    print(f"checkpoint: {args.checkpoint} (step {payload['step']}), loaded back with weights_only=True: "
          f"val loss {val_again:.3f}")

    if args.sample_tokens > 0:
        torch.manual_seed(args.seed)  # the samples are reproducible for a given --seed
        for prompt in PROMPTS:
            idx = torch.tensor([tok2.encode(prompt)], dtype=torch.long, device=device)
            with autocast():
                out = loaded.generate(idx, args.sample_tokens, temperature=args.temperature, top_k=args.top_k)
            print(f"\n--- sample (prompt {prompt!r}) ---")
            print(tok2.decode(out[0].tolist()).strip("\n"))
        print()

    if args.compare:
        torch.manual_seed(args.seed)
        twin = GPT(config).to(device)  # the same model, on fasttx's torch path (torch's own ops)
        with fasttx.use_backend("torch"):
            stats_t = train(twin, args, train_data, val_batches, device, autocast, "torch")
        print(f"tokens/s: fasttx {stats['tokens_per_s']:,.0f} vs torch {stats_t['tokens_per_s']:,.0f} "
              f"(x{stats['tokens_per_s'] / stats_t['tokens_per_s']:.2f}); best val loss fasttx "
              f"{stats['best_val']:.3f} vs torch {stats_t['best_val']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
