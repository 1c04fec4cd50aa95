"""RMSNorm and the fused residual add + RMSNorm, against torch eager, torch.compile of the same
eager code, and (if importable) Liger-Kernel's RMSNorm and fused add-RMSNorm.

Byte counts (each input read once, each output written once; rows M, hidden N, element size e):
  rms_norm      fwd  x, w -> y, rstd                         2MNe + Ne + 4M
                bwd  dy, x, w, rstd -> dx, dw                 3MNe + 2Ne + 4M
  add_rms_norm  (Llama's casting order; h = x + residual, the new residual stream, is an output)
                fwd  x, res, w -> y, h, rstd                  4MNe + Ne + 4M
                bwd  dy, dh, h, w, rstd -> dx, dres, dw       5MNe + 2Ne + 4M
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

import fasttx.functional as ff

from .harness import Case, Config, Provider, Suite, Work, importable, nbytes, randn, torch_and_compile

EPS = 1e-6


def _sizes(cfg: Config):
    if cfg.size == "tiny":
        return 16, [64, 256]
    if cfg.size == "quick":
        return 4096, [4096, 8192]
    return 4096, [1024, 2048, 4096, 5120, 8192, 16384]  # M = 4096 tokens; Llama hidden sizes


def _inputs(case: Case, cfg: Config, residual=False):
    M, N, dt = case.params["M"], case.params["N"], case.dtype
    x = randn(M, N, dtype=dt, device=cfg.device, requires_grad=True)
    w = (1 + 0.1 * randn(N, dtype=torch.float32, device=cfg.device)).to(dt).requires_grad_()
    if not residual:
        return x, w
    return x, randn(M, N, dtype=dt, device=cfg.device, requires_grad=True), w


def _rms_bytes(M, N, dt):
    fwd = nbytes((2 * M * N + N, dt), (M, 4))
    bwd = nbytes((3 * M * N + 2 * N, dt), (M, 4))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _add_bytes(M, N, dt):
    fwd = nbytes((4 * M * N + N, dt), (M, 4))
    bwd = nbytes((5 * M * N + 2 * N, dt), (M, 4))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


# --- RMSNorm ---------------------------------------------------------------------------------
def _fasttx_rms(case, cfg):
    x, w = _inputs(case, cfg)
    N = case.params["N"]
    return Work(lambda: ff.rms_norm(x, [N], w, EPS), leaves=(x, w))


def _torch_rms(case, cfg):
    x, w = _inputs(case, cfg)
    N = case.params["N"]

    def eager():
        return F.rms_norm(x, [N], w, EPS)

    return Work(eager, leaves=(x, w))


def _liger_rms(case, cfg):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    x, w = _inputs(case, cfg)
    # casting_mode "none": Liger's counterpart of torch's order; in_place=False keeps dy intact
    return Work(lambda: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "none", False), leaves=(x, w))


# --- offset RMSNorm: x / rms(x) * (1 + w) ------------------------------------------------------
def _fasttx_offset(case, cfg):
    x, w = _inputs(case, cfg)
    N = case.params["N"]
    return Work(lambda: ff.offset_rms_norm(x, [N], w, EPS), leaves=(x, w))


def _torch_offset(case, cfg):
    x, w = _inputs(case, cfg)

    def eager():  # HF GemmaRMSNorm's formula
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
        return (xf * (1.0 + w.float())).type_as(x)

    return Work(eager, leaves=(x, w))


# --- residual add + RMSNorm (Llama's casting order) ------------------------------------------
def _fasttx_add(case, cfg):
    x, res, w = _inputs(case, cfg, residual=True)
    N = case.params["N"]
    return Work(lambda: ff.add_rms_norm(x, res, N, w, EPS, cast="llama"), leaves=(x, res, w))


def _torch_add(case, cfg):
    x, res, w = _inputs(case, cfg, residual=True)

    def eager():  # HF LlamaRMSNorm after the residual add
        h = x + res
        hf = h.float()
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)
        return w * hf.to(h.dtype), h

    return Work(eager, leaves=(x, res, w))


def _liger_add(case, cfg):
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

    x, res, w = _inputs(case, cfg, residual=True)
    return Work(lambda: LigerFusedAddRMSNormFunction.apply(x, res, w, EPS, 0.0, "llama", False),
                leaves=(x, res, w))


def suites(cfg: Config) -> List[Suite]:
    M, Ns = _sizes(cfg)
    rms_cases, add_cases = [], []
    for dt in cfg.dtypes:
        for N in Ns:
            params = {"M": M, "N": N}
            rms_cases.append(Case(f"M={M} N={N}", N, dt, params, bytes=_rms_bytes(M, N, dt)))
            add_cases.append(Case(f"M={M} N={N}", N, dt, params, bytes=_add_bytes(M, N, dt)))
    rms = Suite(
        "rms_norm", "GB/s", rms_cases,
        [Provider("fasttx", _fasttx_rms, kind="fasttx"), *torch_and_compile("torch", _torch_rms),
         Provider("liger", _liger_rms, importable("liger_kernel.ops.rms_norm"), kind="peer",
                  errors_are_skips=True)],
        xlabel="hidden N (M = rows fixed)",
        description="F.rms_norm over the last dim of an (M, N) tensor with a weight.",
    )
    add = Suite(
        "add_rms_norm", "GB/s", add_cases,
        [Provider("fasttx", _fasttx_add, kind="fasttx"), *torch_and_compile("torch", _torch_add),
         Provider("liger", _liger_add, importable("liger_kernel.ops.fused_add_rms_norm"), kind="peer",
                  errors_are_skips=True)],
        xlabel="hidden N (M = rows fixed)",
        description="(RMSNorm(x + res), x + res) in Llama's casting order; torch = the eager add "
        "and HF's LlamaRMSNorm formula.",
    )
    offset = Suite(
        "offset_rms_norm", "GB/s", rms_cases,  # the bytes of rms_norm's cases: same reads and writes
        [Provider("fasttx", _fasttx_offset, kind="fasttx"), *torch_and_compile("torch", _torch_offset)],
        xlabel="hidden N (M = rows fixed)",
        description="x / rms(x) * (1 + w) over the last dim of an (M, N) tensor; torch = HF's "
        "GemmaRMSNorm formula.",
    )
    return [rms, add, offset]
