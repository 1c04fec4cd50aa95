"""The gated MLP activations, SwiGLU silu(gate) * up and GeGLU gelu_tanh(gate) * up, against torch
eager, torch.compile of the same eager code, and (if importable) Liger-Kernel's SiLUMul/GELUMul.

Byte counts (numel n = M * N of each of gate, up and y; element size e):
  fwd  gate, up -> y                  3ne
  bwd  dy, gate, up -> dgate, dup     5ne
"""
from __future__ import annotations

from typing import List

import torch.nn.functional as F

import fasttx.functional as ff

from .harness import Case, Config, Provider, Suite, Work, importable, nbytes, randn, torch_and_compile


def _sizes(cfg: Config):
    if cfg.size == "tiny":
        return 16, [64, 256]
    if cfg.size == "quick":
        return 4096, [11008, 14336]
    return 4096, [2048, 5632, 8192, 11008, 14336, 28672]  # M = 4096 tokens; Llama intermediates


def _gate_up(case, cfg):
    M, N, dt = case.params["M"], case.params["N"], case.dtype
    return (randn(M, N, dtype=dt, device=cfg.device, requires_grad=True),
            randn(M, N, dtype=dt, device=cfg.device, requires_grad=True))


def _fasttx(case, cfg):
    g, u = _gate_up(case, cfg)
    if case.params["act"] == "swiglu":
        return Work(lambda: ff.swiglu(g, u), leaves=(g, u))
    return Work(lambda: ff.geglu(g, u, approximate="tanh"), leaves=(g, u))


def _torch(case, cfg):
    g, u = _gate_up(case, cfg)
    swiglu = case.params["act"] == "swiglu"

    def eager():
        return (F.silu(g) if swiglu else F.gelu(g, approximate="tanh")) * u

    return Work(eager, leaves=(g, u))


def _liger(case, cfg):
    g, u = _gate_up(case, cfg)
    if case.params["act"] == "swiglu":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction as fn
    else:
        from liger_kernel.ops.geglu import LigerGELUMulFunction as fn  # the tanh form
    return Work(lambda: fn.apply(g, u), leaves=(g, u))


def suites(cfg: Config) -> List[Suite]:
    M, Ns = _sizes(cfg)
    cases = []
    for dt in cfg.dtypes:
        for act in ("swiglu", "geglu_tanh"):
            for N in Ns:
                n = M * N
                fwd, bwd = nbytes((3 * n, dt)), nbytes((5 * n, dt))
                cases.append(Case(f"M={M} N={N}", N, dt, {"M": M, "N": N, "act": act}, series=act,
                                  bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}))
    return [Suite(
        "gated_mlp", "GB/s", cases,
        [Provider("fasttx", _fasttx, kind="fasttx"), *torch_and_compile("torch", _torch),
         Provider("liger", _liger, importable("liger_kernel.ops.swiglu"), kind="peer", errors_are_skips=True)],
        xlabel="intermediate N (M = tokens fixed)",
        description="act(gate) * up for (M, N) gate and up; torch = F.silu / F.gelu then * (two kernels eager).",
    )]
