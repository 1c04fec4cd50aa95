"""Softmax over the last dim, against torch eager, torch.compile of the same eager code and
Liger-Kernel's softmax (if importable).

Byte counts (numel n = M * N, element size e): fwd x -> y 2ne; bwd y, dy -> dx 3ne.
"""
from __future__ import annotations

from typing import List

import torch.nn.functional as F

import fasttx.functional as ff

from .harness import Case, Config, Provider, Suite, Work, importable, nbytes, randn, torch_and_compile


def _sizes(cfg: Config):
    if cfg.size == "tiny":
        return 16, [128, 1000]
    if cfg.size == "quick":
        return 4096, [1024, 8192]
    return 4096, [256, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


def _x(case, cfg):
    return randn(case.params["M"], case.params["N"], dtype=case.dtype, device=cfg.device,
                 requires_grad=True, scale=3.0)


def _fasttx(case, cfg):
    x = _x(case, cfg)
    return Work(lambda: ff.softmax(x, dim=-1), leaves=(x,))


def _torch(case, cfg):
    x = _x(case, cfg)

    def eager():
        return F.softmax(x, dim=-1)

    return Work(eager, leaves=(x,))


def _liger(case, cfg):
    from liger_kernel.ops.softmax import LigerSoftmaxFunction

    x = _x(case, cfg)
    return Work(lambda: LigerSoftmaxFunction.apply(x), leaves=(x,))


def suites(cfg: Config) -> List[Suite]:
    M, Ns = _sizes(cfg)
    cases = []
    for dt in cfg.dtypes:
        for N in Ns:
            fwd, bwd = nbytes((2 * M * N, dt)), nbytes((3 * M * N, dt))
            cases.append(Case(f"M={M} N={N}", N, dt, {"M": M, "N": N},
                              bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}))
    return [Suite("softmax", "GB/s", cases,
                  [Provider("fasttx", _fasttx, kind="fasttx"), *torch_and_compile("torch", _torch),
                   Provider("liger", _liger, importable("liger_kernel.ops.softmax"), kind="peer")],
                  xlabel="N (M = rows fixed)", description="F.softmax(x, dim=-1) of an (M, N) tensor.")]
