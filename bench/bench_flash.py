"""fasttx.flash (flash-attn's API on fasttx's kernels) against flash-attn itself (if importable),
SDPA with the equivalent boolean mask materialised, and FlexAttention (compiled) for the cases
it can express (sliding window, softcap).

Suites (q/k/v (B, L, H, E) in flash-attn's layout; B*L = 16k tokens, H*E = 2048 on GPU):
  flash_window  causal sliding window of W keys: FLOPs counted over the visible pairs only,
                fwd = 4 * B * H * E * sum_i min(i + 1, W + 1); bwd = 2.5 * fwd.
  flash_softcap causal, softcap 30 (Gemma-2): fwd = 2 * B * H * L^2 * E (half the scores).
  flash_varlen  packed sequences of mixed lengths (total 16k tokens), causal; SDPA runs the padded
                batch with a key-padding + causal mask. FLOPs over each sequence's causal half.
  flash_kvcache decode, one query per sequence against per-batch cache lengths (paged cache,
                page 256); memory-bound: GB/s over the cached keys/values actually read.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from fasttx import flash as X

from .harness import (Case, Config, Provider, Suite, Unsupported, Work, compile_available, compiled, importable,
                      nbytes, randn)


def _qkv(case, cfg):
    p = case.params
    mk = lambda n: randn(p["B"], n, p["H"], p["E"], dtype=case.dtype, device=cfg.device, requires_grad=True)  # noqa: E731
    return mk(p["L"]), mk(p["L"]), mk(p["L"])


def _window_mask(L, W, device):
    i = torch.arange(L, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d <= W)  # (L, L) True = attend


# ---- window / softcap: fasttx, flash-attn, sdpa (mask), flex --------------------------------
def _fasttx(case, cfg):
    q, k, v = _qkv(case, cfg)
    kw = case.params["kw"]
    return Work(lambda: X.flash_attn_func(q, k, v, causal=True, **kw), leaves=(q, k, v))


def _flash_attn(case, cfg):
    import flash_attn

    q, k, v = _qkv(case, cfg)
    kw = case.params["kw"]
    return Work(lambda: flash_attn.flash_attn_func(q, k, v, causal=True, **kw), leaves=(q, k, v))


def _sdpa(case, cfg):
    p = case.params
    if p["kw"].get("softcap"):
        raise Unsupported("SDPA has no softcap")
    q, k, v = _qkv(case, cfg)
    mask = _window_mask(p["L"], p["kw"]["window_size"][0], cfg.device)
    return Work(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       attn_mask=mask), leaves=(q, k, v))


def _flex(case, cfg):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = case.params
    W, cap = p["kw"].get("window_size", (-1, -1))[0], p["kw"].get("softcap", 0.0)

    def visible(b, h, qi, kj):
        return (qi >= kj) & ((qi - kj <= W) if W >= 0 else (qi >= kj))

    def score_mod(s, b, h, qi, kj):
        return cap * torch.tanh(s / cap)

    block_mask = create_block_mask(visible, None, None, p["L"], p["L"], device=cfg.device)
    flex = compiled(flex_attention, cfg)
    q, k, v = _qkv(case, cfg)
    return Work(lambda: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                             score_mod=score_mod if cap else None), leaves=(q, k, v))


# ---- varlen -----------------------------------------------------------------------------------
def _lens(case):
    return case.params["lens"]


def _packed(case, cfg):
    p, lens = case.params, _lens(case)
    mk = lambda: randn(sum(lens), p["H"], p["E"], dtype=case.dtype, device=cfg.device, requires_grad=True)  # noqa: E731
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=cfg.device)
    return mk(), mk(), mk(), cu, max(lens)


def _varlen(mod):
    def build(case, cfg):
        fn = X.flash_attn_varlen_func if mod == "fasttx" else __import__("flash_attn").flash_attn_varlen_func
        q, k, v, cu, m = _packed(case, cfg)
        return Work(lambda: fn(q, k, v, cu, cu, m, m, causal=True), leaves=(q, k, v))
    return build


def _varlen_sdpa(case, cfg):
    p, lens = case.params, _lens(case)
    B, L = len(lens), max(lens)
    mk = lambda: randn(B, p["H"], L, p["E"], dtype=case.dtype, device=cfg.device, requires_grad=True)  # noqa: E731
    q, k, v = mk(), mk(), mk()
    keys = torch.arange(L, device=cfg.device)[None, :] < torch.tensor(lens, device=cfg.device)[:, None]  # (B, L)
    mask = (torch.ones(L, L, dtype=torch.bool, device=cfg.device).tril() & keys[:, None, :])[:, None]  # (B, 1, L, L)
    return Work(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), leaves=(q, k, v))


# ---- kv-cache decode --------------------------------------------------------------------------
def _cache(case, cfg, paged):
    p = case.params
    B, H, E, S = p["B"], p["H"], p["E"], p["S"]
    page = 256 if S % 256 == 0 else S
    n = S // page
    q = randn(B, 1, H, E, dtype=case.dtype, device=cfg.device)
    kc = randn(B * n, page, H, E, dtype=case.dtype, device=cfg.device)
    vc = randn(B * n, page, H, E, dtype=case.dtype, device=cfg.device)
    table = torch.randperm(B * n, device=cfg.device).to(torch.int32).view(B, n)
    seqlens = torch.tensor(p["cache_lens"], dtype=torch.int32, device=cfg.device)
    if not paged:
        kc, vc, table = kc.view(B, S, H, E), vc.view(B, S, H, E), None
    return q, kc, vc, table, seqlens


def _kvcache(mod):
    def build(case, cfg):
        fn = X.flash_attn_with_kvcache if mod == "fasttx" else __import__("flash_attn").flash_attn_with_kvcache
        q, kc, vc, table, seqlens = _cache(case, cfg, paged=True)
        return Work(lambda: fn(q, kc, vc, cache_seqlens=seqlens, block_table=table), inputs=(q, kc, vc))
    return build


def _kvcache_sdpa(case, cfg):
    q, kc, vc, _, seqlens = _cache(case, cfg, paged=False)
    S = kc.shape[1]
    mask = (torch.arange(S, device=cfg.device)[None, :] < seqlens[:, None])[:, None, None, :]  # (B, 1, 1, S)
    return Work(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                                       attn_mask=mask), inputs=(q, kc, vc))


def suites(cfg: Config) -> List[Suite]:
    tiny = cfg.size == "tiny"
    seqs = [128] if tiny else ([2048, 8192] if cfg.size == "quick" else [1024, 2048, 4096, 8192, 16384])
    E = 64 if tiny else 128
    window, softcap, varlen, kvcache = [], [], [], []
    for dt in cfg.dtypes:
        for L in seqs:
            B, H = (1, 2) if tiny else (max(1, 16384 // L), 2048 // E)
            for W in ([32] if tiny else [256, 4096]):
                pairs = sum(min(i + 1, W + 1) for i in range(L))
                fwd = 4.0 * B * H * E * pairs
                window.append(Case(f"B={B} H={H} L={L} W={W}", L, dt,
                                   dict(B=B, H=H, L=L, E=E, kw=dict(window_size=(W, 0))), series=f"window={W}",
                                   flops={"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}))
            fwd = 2.0 * B * H * L * L * E
            softcap.append(Case(f"B={B} H={H} L={L}", L, dt, dict(B=B, H=H, L=L, E=E, kw=dict(softcap=30.0)),
                                series="softcap=30", flops={"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}))
        total = 256 if tiny else 16384
        H = 2 if tiny else 2048 // E
        for top in ([128] if tiny else [1024, 4096]):
            lens, n = [], 0
            while n < total:  # lengths cycle top, top/4, top/2, 1: mixed, with a length-1 sequence
                lens.append(min([top, top // 4, top // 2, 1][len(lens) % 4], total - n))
                n += lens[-1]
            fwd = sum(2.0 * H * E * n * (n + 1) for n in lens)
            varlen.append(Case(f"H={H} max={top} n={len(lens)}", top, dt, dict(H=H, E=E, lens=lens),
                               series="causal packed", flops={"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}))
        for S in ([512] if tiny else [4096, 32768]):
            B, H = (2, 2) if tiny else (8, 16)
            lens = [S // (1 + b % 4) for b in range(B)]  # per-batch lengths: S, S/2, S/3, S/4, ...
            read = sum(lens)
            kvcache.append(Case(f"B={B} H={H} S={S}", S, dt, dict(B=B, H=H, E=E, S=S, cache_lens=lens),
                                series=f"hd={E}", bytes={"fwd": nbytes((2 * read * H * E + 2 * B * H * E, dt))},
                                flops={"fwd": 4.0 * read * H * E}, modes=("fwd",)))

    fa = importable("flash_attn")
    dense = [Provider("fasttx", _fasttx, kind="fasttx"), Provider("flash_attn", _flash_attn, fa, kind="peer"),
             Provider("sdpa-mask", _sdpa, kind="torch", errors_are_skips=True),
             Provider("flex", _flex, available=compile_available, kind="compile", errors_are_skips=True)]
    return [
        Suite("flash_window", "TFLOP/s", window, dense, baseline="sdpa-mask", xlabel="sequence length",
              description="flash_attn_func, causal sliding window (left=W); FLOPs over visible pairs."),
        Suite("flash_softcap", "TFLOP/s", softcap, dense, baseline="flex" if cfg.cuda else "fasttx",
              xlabel="sequence length", description="flash_attn_func, causal, softcap=30."),
        Suite("flash_varlen", "TFLOP/s", varlen,
              [Provider("fasttx", _varlen("fasttx"), kind="fasttx"),
               Provider("flash_attn", _varlen("flash_attn"), fa, kind="peer"),
               Provider("sdpa-padded", _varlen_sdpa, kind="torch", errors_are_skips=True)],
              baseline="sdpa-padded", xlabel="longest sequence",
              description="flash_attn_varlen_func, packed causal sequences vs SDPA on the padded batch."),
        Suite("flash_kvcache", "GB/s", kvcache,
              [Provider("fasttx", _kvcache("fasttx"), kind="fasttx"),
               Provider("flash_attn", _kvcache("flash_attn"), fa, kind="peer"),
               Provider("sdpa-mask", _kvcache_sdpa, kind="torch")],
              modes=("fwd",), baseline="sdpa-mask", xlabel="cache length S",
              description="flash_attn_with_kvcache, one query, per-batch cache lengths, paged (page 256)."),
    ]
