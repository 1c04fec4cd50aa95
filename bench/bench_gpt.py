"""End to end: a GPT-2-small-sized model built from fasttx, on its Triton path against the same model
on its torch path (`fasttx.use_backend("torch")`: torch's own ops), eager and torch.compile'd.

gpt_train     one training step: forward under autocast (bf16 on CUDA), fp32 cross-entropy,
              backward, AdamW step (fused on CUDA), zero_grad. tokens = B * T per step.
              Dropout 0.1 (GPT-2's), so the dropout paths are part of what is measured.
gpt_generate  model.generate(prompt, max_new_tokens, use_cache=True|False) in eval mode:
              tokens = B * max_new_tokens per call (the prefill is part of the call).
peak_total_MB is torch.cuda.max_memory_allocated() over one call (weights, AdamW state included).
"""
from __future__ import annotations

import contextlib
from typing import List

import torch

from .harness import Case, Config, Provider, Suite, Work, compile_available, compiled

ORDER = 90  # the end-to-end model runs after the ops (bench.harness.discover)
DROPOUT = 0.1


def _autocast_dtype(cfg: Config):
    low = [d for d in cfg.dtypes if d in (torch.bfloat16, torch.float16)]
    if cfg.cuda:
        return low[0] if low else torch.bfloat16
    return low[0] if low else torch.float32  # CPU: fp32 unless a 16-bit dtype was asked for


def _model_config(cfg: Config):
    from fasttx.models import GPTConfig

    if cfg.size == "tiny":
        return GPTConfig.preset("gpt2", n_layer=2, n_head=2, n_embd=64, block_size=64,
                                vocab_size=512, dropout=DROPOUT)
    # GPT-2 small with the vocabulary padded to a multiple of 64 (50304), as when training from scratch
    return GPTConfig.preset("gpt2", vocab_size=50304, dropout=DROPOUT)


def _autocast(cfg: Config, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=dtype)


def _model(case: Case, cfg: Config):
    from fasttx.models import GPT

    torch.manual_seed(0)  # same initial weights for every provider
    return GPT(case.params["config"]).to(cfg.device)


# provider -> fasttx backend: "fasttx" the default path (Triton kernels on CUDA), "torch" torch's ops
_BACKEND = {"fasttx": "auto", "torch": "torch"}


def _train(impl: str, compile_model: bool):
    import fasttx

    def build(case: Case, cfg: Config) -> Work:
        model = _model(case, cfg).train()
        opt = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4)
        fwd = compiled(model, cfg) if compile_model else model
        B, T, V = case.params["B"], case.params["T"], case.params["config"].vocab_size
        idx = torch.randint(0, V, (B, T), device=cfg.device)
        targets = torch.randint(0, V, (B, T), device=cfg.device)

        def step():
            with fasttx.use_backend(_BACKEND[impl]), _autocast(cfg, case.dtype):
                _, loss = fwd(idx, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return Work(step)

    return build


def _generate(impl: str):
    import fasttx

    def build(case: Case, cfg: Config) -> Work:
        model = _model(case, cfg).eval()
        p = case.params
        prompt = torch.randint(0, p["config"].vocab_size, (p["B"], p["prompt"]), device=cfg.device)

        def gen():
            with fasttx.use_backend(_BACKEND[impl]), _autocast(cfg, case.dtype):
                return model.generate(prompt, p["new"], use_cache=p["use_cache"])

        return Work(gen)

    return build


def suites(cfg: Config) -> List[Suite]:
    try:
        mcfg = _model_config(cfg)
    except Exception as e:  # fasttx.models is another part of the project; say so if it is absent
        reason = f"fasttx.models not importable ({type(e).__name__}: {e})"
        return [Suite("gpt_train", "tokens/s", [], [], modes=("call",), unavailable=reason),
                Suite("gpt_generate", "tokens/s", [], [], modes=("call",), unavailable=reason)]
    dt = _autocast_dtype(cfg)
    tiny = cfg.size == "tiny"
    B, T = (2, 32) if tiny else (4 if cfg.size == "quick" else 8, 1024)
    train = [Case(f"B={B} T={T} L={mcfg.n_layer} C={mcfg.n_embd}", T, dt,
                  {"B": B, "T": T, "config": mcfg}, tokens=B * T, modes=("call",))]
    new, prompt = (4, 4) if tiny else (128 if cfg.size == "quick" else 256, 16)
    gen = []
    for use_cache in (True, False):
        for b in ([1] if tiny else [1, 8]):
            gen.append(Case(f"B={b} prompt={prompt} new={new}", b, dt,
                            {"B": b, "prompt": prompt, "new": new, "use_cache": use_cache, "config": mcfg},
                            series=f"use_cache={use_cache}", tokens=b * new, modes=("call",)))
    return [
        Suite("gpt_train", "tokens/s", train,
              [Provider("fasttx", _train("fasttx", False), kind="fasttx"),
               Provider("torch", _train("torch", False), kind="torch"),
               Provider("torch.compile", _train("torch", True), compile_available, kind="compile"),
               Provider("fasttx.compile", _train("fasttx", True), compile_available, kind="compile")],
              modes=("call",), xlabel="sequence length", rep_ms=2000.0,
              description=f"Training step of a GPT-2-shaped model (n_layer={mcfg.n_layer}, n_embd={mcfg.n_embd}, "
              f"vocab {mcfg.vocab_size}; {'autocast ' + str(dt).split('.')[-1] if dt != torch.float32 else 'fp32'}), "
              f"dropout {DROPOUT}, AdamW; 'torch' is the same model on fasttx's torch path."),
        Suite("gpt_generate", "tokens/s", gen,
              [Provider("fasttx", _generate("fasttx"), kind="fasttx"),
               Provider("torch", _generate("torch"), kind="torch")],
              modes=("call",), xlabel="batch", rep_ms=2000.0,
              description="model.generate (temperature 1, no top-k), eval mode; prefill included."),
    ]
