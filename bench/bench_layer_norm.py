"""LayerNorm and the fused residual + dropout + LayerNorm, against torch eager, torch.compile of the
same eager code, and (if importable) Liger-Kernel, Apex and flash-attn's Triton LayerNorm.

Byte counts (each input read once, each output written once; rows M, hidden N, element size e):
  layer_norm  fwd      x, w, b -> y, mean, rstd           2MNe + 2Ne + 8M
              bwd      dy, x, w, mean, rstd -> dx, dw, db  3MNe + 3Ne + 8M
  dropout_add_layer_norm (p = 0.1, the residual stream kept as an output, h = res + drop(x))
              fwd      x, res, w, b -> y, h, mean, rstd    4MNe + 2Ne + 8M
              bwd      dy, dh, h, w, mean, rstd -> dx, dres, dw, db   5MNe + 3Ne + 8M
The mask is not counted: fasttx regenerates it; torch stores it (saved_MB shows the difference).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

import fasttx.functional as ff

from .harness import Case, Config, Provider, Suite, Work, importable, nbytes, randn, torch_and_compile

EPS = 1e-5
P_DROP = 0.1


def _sizes(cfg: Config):
    if cfg.size == "tiny":
        return 16, [64, 256]
    if cfg.size == "quick":
        return 4096, [1024, 4096]
    return 4096, [512, 768, 1024, 2048, 4096, 8192, 16384]  # M = 4096 rows (B*T = 4 x 1024)


def _ln_bytes(M, N, dt):
    fwd = nbytes((2 * M * N + 2 * N, dt), (2 * M, 4))
    bwd = nbytes((3 * M * N + 3 * N, dt), (2 * M, 4))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _daln_bytes(M, N, dt):
    fwd = nbytes((4 * M * N + 2 * N, dt), (2 * M, 4))
    bwd = nbytes((5 * M * N + 3 * N, dt), (2 * M, 4))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _inputs(case: Case, cfg: Config, residual=False):
    M, N, dt = case.params["M"], case.params["N"], case.dtype
    x = randn(M, N, dtype=dt, device=cfg.device, requires_grad=True)
    w = (1 + 0.1 * randn(N, dtype=torch.float32, device=cfg.device)).to(dt).requires_grad_()
    b = randn(N, dtype=dt, device=cfg.device, requires_grad=True, scale=0.1)
    if not residual:
        return x, w, b
    res = randn(M, N, dtype=dt, device=cfg.device, requires_grad=True)
    return x, res, w, b


# --- LayerNorm -------------------------------------------------------------------------------
def _fasttx_ln(case, cfg):
    x, w, b = _inputs(case, cfg)
    N = case.params["N"]
    return Work(lambda: ff.layer_norm(x, (N,), w, b, EPS), leaves=(x, w, b))


def _torch_ln(case, cfg):
    x, w, b = _inputs(case, cfg)
    N = case.params["N"]

    def eager():
        return F.layer_norm(x, (N,), w, b, EPS)

    return Work(eager, leaves=(x, w, b))


def _liger_ln(case, cfg):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    x, w, b = _inputs(case, cfg)
    return Work(lambda: LigerLayerNormFunction.apply(x, w, b, EPS), leaves=(x, w, b))


def _apex_ln(case, cfg):
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine

    x, w, b = _inputs(case, cfg)
    N = case.params["N"]
    return Work(lambda: fused_layer_norm_affine(x, w, b, (N,), EPS), leaves=(x, w, b))


def _flash_ln(case, cfg):
    from flash_attn.ops.triton.layer_norm import layer_norm_fn

    x, w, b = _inputs(case, cfg)
    return Work(lambda: layer_norm_fn(x, w, b, eps=EPS), leaves=(x, w, b))


# --- residual + dropout + LayerNorm -----------------------------------------------------------
def _fasttx_daln(case, cfg):
    x, res, w, b = _inputs(case, cfg, residual=True)
    N = case.params["N"]
    return Work(lambda: ff.dropout_add_layer_norm(x, res, (N,), w, b, EPS, P_DROP, True),
                leaves=(x, res, w, b))


def _torch_daln(case, cfg):
    x, res, w, b = _inputs(case, cfg, residual=True)
    N = case.params["N"]

    def eager():
        h = res + F.dropout(x, P_DROP, True)
        return F.layer_norm(h, (N,), w, b, EPS), h

    return Work(eager, leaves=(x, res, w, b))


def _flash_daln(case, cfg):
    from flash_attn.ops.triton.layer_norm import layer_norm_fn

    x, res, w, b = _inputs(case, cfg, residual=True)
    # prenorm=True also returns the updated residual stream, like fasttx's (y, h)
    return Work(lambda: layer_norm_fn(x, w, b, residual=res, eps=EPS, dropout_p=P_DROP, prenorm=True),
                leaves=(x, res, w, b))


def suites(cfg: Config) -> List[Suite]:
    M, Ns = _sizes(cfg)
    ln_cases, daln_cases = [], []
    for dt in cfg.dtypes:
        for N in Ns:
            params = {"M": M, "N": N}
            ln_cases.append(Case(f"M={M} N={N}", N, dt, params, bytes=_ln_bytes(M, N, dt)))
            daln_cases.append(Case(f"M={M} N={N} p={P_DROP}", N, dt, dict(params, p=P_DROP),
                                   bytes=_daln_bytes(M, N, dt)))
    ln = Suite(
        "layer_norm", "GB/s", ln_cases,
        [Provider("fasttx", _fasttx_ln, kind="fasttx"), *torch_and_compile("torch", _torch_ln),
         Provider("liger", _liger_ln, importable("liger_kernel"), kind="peer"),
         Provider("apex", _apex_ln, importable("apex.normalization"), kind="peer"),
         Provider("flash_attn", _flash_ln, importable("flash_attn.ops.triton.layer_norm"), kind="peer")],
        xlabel="hidden N (M = rows fixed)",
        description="F.layer_norm over the last dim of an (M, N) tensor, weight and bias.",
    )
    daln = Suite(
        "dropout_add_layer_norm", "GB/s", daln_cases,
        [Provider("fasttx", _fasttx_daln, kind="fasttx"), *torch_and_compile("torch", _torch_daln),
         Provider("flash_attn", _flash_daln, importable("flash_attn.ops.triton.layer_norm"), kind="peer")],
        xlabel="hidden N (M = rows fixed)",
        description="(LN(res + dropout(x)), res + dropout(x)), p = 0.1, training; torch = the "
        "eager composition of F.dropout, + and F.layer_norm.",
    )
    return [ln, daln]
