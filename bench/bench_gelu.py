"""GELU (exact and tanh) and the fused bias + GELU, against torch eager and torch.compile of the
same eager code. (Liger-Kernel, Apex and flash-attn have no stand-alone GELU to compare with.)

Byte counts (numel n = M * N, element size e; each input read once, each output written once):
  gelu       fwd  x -> y            2ne       bwd  dy, x -> dx            3ne
  bias_gelu  fwd  x, b -> y         2ne + Ne  bwd  dy, x, b -> dx, db     3ne + 2Ne
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

import fasttx.functional as ff

from .harness import Case, Config, Provider, Suite, Work, nbytes, randn, torch_and_compile


def _sizes(cfg: Config):
    if cfg.size == "tiny":
        return 16, [256, 1024]
    if cfg.size == "quick":
        return 4096, [3072, 8192]
    return 4096, [1024, 2048, 3072, 4096, 8192, 16384, 32768]  # N = the MLP's 4 x hidden


def _x(case, cfg):
    return randn(case.params["M"], case.params["N"], dtype=case.dtype, device=cfg.device,
                 requires_grad=True)


def _b(case, cfg):
    return randn(case.params["N"], dtype=case.dtype, device=cfg.device, requires_grad=True)


def _fasttx_gelu(case, cfg):
    x, approx = _x(case, cfg), case.params["approximate"]
    return Work(lambda: ff.gelu(x, approx), leaves=(x,))


def _torch_gelu(case, cfg):
    x, approx = _x(case, cfg), case.params["approximate"]

    def eager():
        return F.gelu(x, approximate=approx)

    return Work(eager, leaves=(x,))


def _fasttx_bias_gelu(case, cfg):
    x, b, approx = _x(case, cfg), _b(case, cfg), case.params["approximate"]
    return Work(lambda: ff.bias_gelu(x, b, approx), leaves=(x, b))


def _torch_bias_gelu(case, cfg):
    x, b, approx = _x(case, cfg), _b(case, cfg), case.params["approximate"]

    def eager():
        return F.gelu(x + b, approximate=approx)

    return Work(eager, leaves=(x, b))


def _fasttx_relu_squared(case, cfg):
    x = _x(case, cfg)
    return Work(lambda: ff.relu_squared(x), leaves=(x,))


def _torch_relu_squared(case, cfg):
    x = _x(case, cfg)

    def eager():
        return torch.square(F.relu(x))

    return Work(eager, leaves=(x,))


def _fasttx_bias_relu(case, cfg):
    x, b = _x(case, cfg), _b(case, cfg)
    return Work(lambda: ff.bias_relu(x, b), leaves=(x, b))


def _torch_bias_relu(case, cfg):
    x, b = _x(case, cfg), _b(case, cfg)

    def eager():
        return F.relu(x + b)

    return Work(eager, leaves=(x, b))


def suites(cfg: Config) -> List[Suite]:
    M, Ns = _sizes(cfg)
    gelu_cases, bias_cases = [], []
    for dt in cfg.dtypes:
        for approx in ("none", "tanh"):
            for N in Ns:
                n = M * N
                params = {"M": M, "N": N, "approximate": approx}
                fwd, bwd = nbytes((2 * n, dt)), nbytes((3 * n, dt))
                gelu_cases.append(Case(f"M={M} N={N}", N, dt, params, series=f"approximate={approx}",
                                       bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}))
                fwd, bwd = nbytes((2 * n + N, dt)), nbytes((3 * n + 2 * N, dt))
                bias_cases.append(Case(f"M={M} N={N}", N, dt, params, series=f"approximate={approx}",
                                       bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}))
    return [
        Suite("gelu", "GB/s", gelu_cases,
              [Provider("fasttx", _fasttx_gelu, kind="fasttx"), *torch_and_compile("torch", _torch_gelu)],
              xlabel="N (M = rows fixed)", description="F.gelu of an (M, N) tensor."),
        Suite("bias_gelu", "GB/s", bias_cases,
              [Provider("fasttx", _fasttx_bias_gelu, kind="fasttx"),
               *torch_and_compile("torch", _torch_bias_gelu)],
              xlabel="N (M = rows fixed)",
              description="gelu(x + b), b of shape (N,); torch = F.gelu(x + b) (two kernels eager)."),
        # bytes: read x, write y (fwd); read x and dy, write dx (bwd), as gelu's cases
        Suite("relu_squared", "GB/s", [c for c in gelu_cases if c.params["approximate"] == "none"],
              [Provider("fasttx", _fasttx_relu_squared, kind="fasttx"),
               *torch_and_compile("torch", _torch_relu_squared)],
              xlabel="N (M = rows fixed)", description="relu(x) ** 2 of an (M, N) tensor; torch = "
              "torch.square(F.relu(x)) (two kernels eager)."),
        Suite("bias_relu", "GB/s", [c for c in bias_cases if c.params["approximate"] == "none"],
              [Provider("fasttx", _fasttx_bias_relu, kind="fasttx"),
               *torch_and_compile("torch", _torch_bias_relu)],
              xlabel="N (M = rows fixed)",
              description="relu(x + b), b of shape (N,); torch = F.relu(x + b) (two kernels eager)."),
    ]
