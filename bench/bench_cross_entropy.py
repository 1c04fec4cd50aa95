"""Linear cross-entropy (the LM head + loss of a training step): time and peak memory of forward +
backward against torch eager (the logits materialised), torch 2.13's chunked path (where torch
has it), torch.compile of the eager code, and (if importable) Liger-Kernel's fused linear
cross-entropy. Peak memory (peak_MB, CUDA) is the point: the (N, C) logits and their gradient
are the step's largest tensors (4096 x 128256 in bf16: 1 GiB, its fp32 gradient 2 GiB).

FLOP counts (rows N, hidden H, vocab C; the useful matmuls, whoever recomputes more):
  fwd      logits = x W^T                          2NHC
  bwd      dx = dlogits W, dW = dlogits^T x        4NHC
fasttx's Triton path recomputes the logits in the backward (8NHC done for 6NHC counted).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

import fasttx.functional as ff

from .harness import Case, Config, Provider, Suite, Unsupported, Work, importable, randn, torch_and_compile


def _sizes(cfg: Config):
    if cfg.size == "tiny":
        return [(64, 32, 1000)]
    if cfg.size == "quick":
        return [(4096, 2048, 32000)]
    return [(4096, 2048, 32000), (4096, 4096, 128256)]  # Llama-2 7B / Llama-3 8B heads, 4096 tokens


def _inputs(case: Case, cfg: Config):
    N, H, C = case.params["N"], case.params["H"], case.params["C"]
    x = randn(N, H, dtype=case.dtype, device=cfg.device, requires_grad=True)
    W = randn(C, H, dtype=case.dtype, device=cfg.device, requires_grad=True, scale=H ** -0.5)
    t = torch.randint(0, C, (N,), device=cfg.device)
    t[::7] = -100  # some padding, as in a real batch
    return x, W, t


def _fasttx(case, cfg):
    x, W, t = _inputs(case, cfg)
    return Work(lambda: ff.linear_cross_entropy(x, W, t), leaves=(x, W))


def _torch_eager(case, cfg):
    x, W, t = _inputs(case, cfg)
    return Work(lambda: F.cross_entropy(F.linear(x, W), t), leaves=(x, W))


def _torch_chunked(case, cfg):
    if not hasattr(F, "linear_cross_entropy"):
        raise Unsupported(f"torch {torch.__version__} has no F.linear_cross_entropy")
    x, W, t = _inputs(case, cfg)
    options = torch.nn.LinearCrossEntropyOptions()
    return Work(lambda: F.linear_cross_entropy(x, W, t, options=options), leaves=(x, W))


def _liger(case, cfg):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    x, W, t = _inputs(case, cfg)
    loss = LigerFusedLinearCrossEntropyLoss()
    return Work(lambda: loss(W, x, t), leaves=(x, W))


def _logits(case, cfg):
    N, C = case.params["N"], case.params["C"]
    z = randn(N, C, dtype=case.dtype, device=cfg.device, requires_grad=True)
    t = torch.randint(0, C, (N,), device=cfg.device)
    t[::7] = -100
    return z, t


def _fasttx_ce(case, cfg):
    z, t = _logits(case, cfg)
    return Work(lambda: ff.cross_entropy(z, t), leaves=(z,))


def _torch_ce(case, cfg):
    z, t = _logits(case, cfg)

    def eager():
        return F.cross_entropy(z, t)

    return Work(eager, leaves=(z,))


def suites(cfg: Config) -> List[Suite]:
    cases = []
    for dt in cfg.dtypes:
        for N, H, C in _sizes(cfg):
            flops = {"fwd": 2.0 * N * H * C, "bwd": 4.0 * N * H * C, "fwd+bwd": 6.0 * N * H * C}
            cases.append(Case(f"N={N} H={H} C={C}", C, dt, {"N": N, "H": H, "C": C}, flops=flops,
                              series=f"N={N}"))
    ce_cases = []
    for dt in cfg.dtypes:
        for N, _, C in _sizes(cfg):
            # bytes: the logits read in the forward, read again and their gradient written in the backward
            fwd, bwd = N * C * dt.itemsize, 2 * N * C * dt.itemsize
            ce_cases.append(Case(f"N={N} C={C}", C, dt, {"N": N, "C": C}, series=f"N={N}",
                                 bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}))
    ce = Suite("cross_entropy", "GB/s", ce_cases,
               [Provider("fasttx", _fasttx_ce, kind="fasttx"), *torch_and_compile("torch", _torch_ce)],
               xlabel="vocabulary C",
               description="F.cross_entropy of given (N, C) logits, 1/7 of the targets ignored.")
    return [ce, Suite(
        "linear_cross_entropy", "TFLOP/s", cases,
        [Provider("fasttx", _fasttx, kind="fasttx"), *torch_and_compile("torch", _torch_eager),
         Provider("torch.chunked", _torch_chunked, kind="torch", errors_are_skips=True),
         Provider("liger", _liger, importable("liger_kernel.transformers.fused_linear_cross_entropy"),
                  kind="peer", errors_are_skips=True)],
        modes=("fwd", "fwd+bwd"),
        xlabel="vocabulary C",
        description="cross_entropy(linear(x, W), t), 1/7 of the targets ignored; torch = the eager "
        "composition (the logits materialised); torch.chunked = F.linear_cross_entropy with "
        "LinearCrossEntropyOptions(); peak_MB (CUDA) is the memory above the inputs.",
    )]
