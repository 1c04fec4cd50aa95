"""Rotary position embedding of q and k (Llama's half rotation, GQA), against torch eager (HF's
apply_rotary_pos_emb formula), torch.compile of the same eager code, and (if importable)
Liger-Kernel's rope.

Byte counts (q (B, Hq, L, D), k (B, Hk, L, D), cos/sin (B, L, D); element size e):
  fwd  q, k, cos, sin -> q_out, k_out          2 (nq + nk) e + 2 B L D e
  bwd  dq_out, dk_out, cos, sin -> dq, dk      2 (nq + nk) e + 2 B L D e
"""
from __future__ import annotations

from typing import List

import torch

import fasttx.functional as ff

from .harness import Case, Config, Provider, Suite, Work, importable, nbytes, randn, torch_and_compile


def _sizes(cfg: Config):
    if cfg.size == "tiny":
        return [(1, 4, 2, 8, 16)]
    if cfg.size == "quick":
        return [(4, 32, 8, 1024, 128)]
    # (B, Hq, Hk, L, D): Llama-2-7B (MHA), Llama-3-8B (GQA 32/8), long context, a small model
    return [(4, 32, 32, 1024, 128), (4, 32, 8, 1024, 128), (1, 32, 8, 8192, 128), (8, 16, 16, 512, 64)]


def _inputs(case, cfg):
    B, Hq, Hk, L, D = (case.params[k] for k in ("B", "Hq", "Hk", "L", "D"))
    dt = case.dtype
    q = randn(B, Hq, L, D, dtype=dt, device=cfg.device, requires_grad=True)
    k = randn(B, Hk, L, D, dtype=dt, device=cfg.device, requires_grad=True)
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device=cfg.device).float() / D)
    freqs = torch.arange(L, device=cfg.device).float()[:, None] * inv
    emb = torch.cat((freqs, freqs), -1)[None].expand(B, L, D)  # HF's (B, L, D) tables
    return q, k, emb.cos().to(dt), emb.sin().to(dt)


def _fasttx(case, cfg):
    q, k, cos, sin = _inputs(case, cfg)
    return Work(lambda: ff.apply_rotary_emb(q, k, cos, sin), leaves=(q, k))


def _torch(case, cfg):
    q, k, cos, sin = _inputs(case, cfg)

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def eager():  # HF's apply_rotary_pos_emb
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s

    return Work(eager, leaves=(q, k))


def _liger(case, cfg):
    from liger_kernel.ops.rope import LigerRopeFunction

    q, k, cos, sin = _inputs(case, cfg)
    return Work(lambda: LigerRopeFunction.apply(q, k, cos, sin), leaves=(q, k))


def suites(cfg: Config) -> List[Suite]:
    cases = []
    for dt in cfg.dtypes:
        for B, Hq, Hk, L, D in _sizes(cfg):
            n = B * (Hq + Hk) * L * D
            b = nbytes((2 * n + 2 * B * L * D, dt))
            cases.append(Case(f"B={B} Hq={Hq} Hk={Hk} L={L} D={D}", B * L, dt,
                              dict(B=B, Hq=Hq, Hk=Hk, L=L, D=D), bytes={"fwd": b, "bwd": b, "fwd+bwd": 2 * b}))
    return [Suite(
        "rotary", "GB/s", cases,
        [Provider("fasttx", _fasttx, kind="fasttx"), *torch_and_compile("torch", _torch),
         Provider("liger", _liger, importable("liger_kernel.ops.rope"), kind="peer", errors_are_skips=True)],
        xlabel="tokens B*L",
        description="RoPE of q and k from HF-shaped (B, L, D) cos/sin; torch = HF's rotate_half formula.",
    )]
