"""Dropout (p = 0.1, training) against torch eager and torch.compile of the same eager code.

Byte counts (numel n, element size e): fwd x -> y 2ne; bwd dy -> dx 2ne. The keep-mask is not
counted: fasttx regenerates it from the seed in the backward; torch stores one byte per element,
which the saved_MB column shows (peak_MB too, on CUDA).
"""
from __future__ import annotations

from typing import List

import torch.nn.functional as F

import fasttx.functional as ff

from .harness import Case, Config, Provider, Suite, Work, nbytes, randn, torch_and_compile

P = 0.1


def _sizes(cfg: Config):
    if cfg.size == "tiny":
        return [2**12, 2**14]
    if cfg.size == "quick":
        return [2**22, 2**26]
    return [2**p for p in range(20, 29, 2)]  # 1M .. 256M elements


def _x(case, cfg):
    return randn(case.params["numel"], dtype=case.dtype, device=cfg.device, requires_grad=True)


def _fasttx(case, cfg):
    x = _x(case, cfg)
    return Work(lambda: ff.dropout(x, P, True), leaves=(x,))


def _torch(case, cfg):
    x = _x(case, cfg)

    def eager():
        return F.dropout(x, P, True)

    return Work(eager, leaves=(x,))


def suites(cfg: Config) -> List[Suite]:
    cases = []
    for dt in cfg.dtypes:
        for n in _sizes(cfg):
            b = nbytes((2 * n, dt))
            cases.append(Case(f"n={n}", n, dt, {"numel": n, "p": P},
                              bytes={"fwd": b, "bwd": b, "fwd+bwd": 2 * b}))
    return [Suite("dropout", "GB/s", cases,
                  [Provider("fasttx", _fasttx, kind="fasttx"), *torch_and_compile("torch", _torch)],
                  xlabel="elements",
                  description=f"F.dropout(x, p={P}, training=True) of a 1-D tensor. saved_MB: "
                  "memory autograd keeps beyond input and output (torch's mask; fasttx's seed).")]
