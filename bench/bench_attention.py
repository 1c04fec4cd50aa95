"""Attention: fasttx's scaled_dot_product_attention against torch SDPA with each backend (flash,
efficient, cudnn, math, each forced with torch.nn.attention.sdpa_kernel; a backend that refuses a
case is recorded as skipped with torch's reason), torch's default SDPA dispatch, FlexAttention
(compiled) and flash-attn's flash_attn_func (if importable).

FLOPs (B batch, H heads, L queries, S keys, E head dim; two matmuls of 2*B*H*L*S*E each):
  fwd = 4 * B * H * L * S * E, halved when causal (half the score matrix is skipped);
  bwd = 2.5 * fwd (five matmuls against the forward's two); fwd+bwd = 3.5 * fwd.
Decode (one query against S cached keys, inference, not causal: the query sees the whole cache) is
memory-bound, so its metric is GB/s: q, K, V read once, out written once, (2*S + 2) * B*H*E * e.
The "fasttx-16bit-delta" provider is an ablation, not a peer: fasttx's own op with the fp32 copy
of the output switched off (16-bit inputs; the backward's delta then comes from the rounded output,
inaccurate on sharp attention), so fasttx vs it is the time and memory the fp32 copy costs.
"fasttx-dq-atomic" and "fasttx-dq-kernel" are ablations of the backward's dQ (kernels/attention/
backward.py): fp32 atomics instead of the default ordered adds (what determinism costs), and the
separate 7-GEMM dQ kernel (what the ordered adds save).
Training cases keep B*S = 16k tokens and H*E = 2048 (flash-attention's benchmark setting).
"""
from __future__ import annotations

import contextlib
from typing import List

import torch.nn.functional as F

import fasttx.functional as ff

from .harness import (Case, Config, Provider, Suite, Unsupported, Work, compile_available, compiled,
                      importable, nbytes, randn)

SDPA_BACKENDS = {  # provider name -> SDPBackend member name
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}


def _train_sizes(cfg: Config):
    if cfg.size == "tiny":
        return [64, 128], [64]
    if cfg.size == "quick":
        return [1024, 4096], [64, 128]
    return [512, 1024, 2048, 4096, 8192, 16384], [64, 128]


def _decode_sizes(cfg: Config):
    if cfg.size == "tiny":
        return [256, 1024], [64]
    if cfg.size == "quick":
        return [4096, 65536], [128]
    return [1024 * 2**i for i in range(7)], [64, 128]  # 1k .. 64k cached keys


def _qkv(case: Case, cfg: Config, layout="bhsd"):
    p = case.params
    B, H, L, S, E = p["B"], p["H"], p["L"], p["S"], p["E"]
    grad = not p["decode"]
    shape_q, shape_kv = ((B, H, L, E), (B, H, S, E)) if layout == "bhsd" else ((B, L, H, E), (B, S, H, E))
    q = randn(*shape_q, dtype=case.dtype, device=cfg.device, requires_grad=grad)
    k = randn(*shape_kv, dtype=case.dtype, device=cfg.device, requires_grad=grad)
    v = randn(*shape_kv, dtype=case.dtype, device=cfg.device, requires_grad=grad)
    return q, k, v


def _fasttx(case, cfg):
    q, k, v = _qkv(case, cfg)
    causal = case.params["causal"]
    return Work(lambda: ff.scaled_dot_product_attention(q, k, v, is_causal=causal), leaves=(q, k, v))


def _fasttx_16bit_delta(case, cfg):
    import math

    from fasttx.ops import attention as op

    q, k, v = _qkv(case, cfg)
    causal, scale = case.params["causal"], 1.0 / math.sqrt(case.params["E"])
    return Work(lambda: op._sdpa_fwd(q, k, v, None, 0.0, causal, scale, False)[0], leaves=(q, k, v))


def _fasttx_dq(mode):
    def build(case, cfg):
        import math

        import torch

        from fasttx.kernels.attention import launch
        from fasttx.kernels.attention.config import DQ_ATOMIC, DQ_KERNEL

        dq_mode = {"atomic": DQ_ATOMIC, "kernel": DQ_KERNEL}[mode]
        q, k, v = _qkv(case, cfg)
        opts = launch.AttnOptions(scale=1.0 / math.sqrt(case.params["E"]), is_causal=case.params["causal"],
                                  return_fp32_out=q.dtype != torch.float32)

        class Attention(torch.autograd.Function):  # the launchers with this dQ mode; nothing else differs
            @staticmethod
            def forward(ctx, q, k, v):
                out, lse, *out32 = launch.attention_forward(q, k, v, None, opts)
                ctx.save_for_backward(q, k, v, out32[0] if out32 else out, lse)
                return out

            @staticmethod
            def backward(ctx, do):
                return launch.attention_backward(do, *ctx.saved_tensors[:3], None, *ctx.saved_tensors[3:],
                                                 opts._replace(return_fp32_out=False), dq_mode=dq_mode)

        return Work(lambda: Attention.apply(q, k, v), leaves=(q, k, v))
    return build


def _cuda_only(cfg):
    return None if cfg.cuda else "an ablation of the Triton path (CUDA only)"


def _sdpa(backend_name):
    def build(case, cfg):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = _qkv(case, cfg)
        causal = case.params["causal"]
        ctx = (lambda: sdpa_kernel(getattr(SDPBackend, backend_name))) if backend_name else contextlib.nullcontext

        def fn():
            with ctx():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return Work(fn, leaves=(q, k, v))

    return build


def _flex(case, cfg):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = case.params
    if p["causal"] and p["L"] != p["S"]:
        raise Unsupported("causal with L != S not benchmarked")
    flex = compiled(flex_attention, cfg)
    q, k, v = _qkv(case, cfg)
    block_mask = None
    if p["causal"]:
        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal, None, None, p["L"], p["S"], device=cfg.device)
    return Work(lambda: flex(q, k, v, block_mask=block_mask), leaves=(q, k, v))


def _flash_attn(case, cfg):
    from flash_attn import flash_attn_func

    q, k, v = _qkv(case, cfg, layout="bshd")  # flash-attn's own layout, so no transpose is timed
    causal = case.params["causal"]
    return Work(lambda: flash_attn_func(q, k, v, causal=causal), leaves=(q, k, v))


def _providers(cfg: Config) -> List[Provider]:
    return [
        Provider("fasttx", _fasttx, kind="fasttx"),
        Provider("fasttx-16bit-delta", _fasttx_16bit_delta, _cuda_only, kind="fasttx", errors_are_skips=True),
        *[Provider(f"fasttx-dq-{mode}", _fasttx_dq(mode), _cuda_only, kind="fasttx", errors_are_skips=True)
          for mode in ("atomic", "kernel")],
        Provider("sdpa", _sdpa(None), kind="torch"),
        *[Provider(name, _sdpa(member), kind="torch", errors_are_skips=True)
          for name, member in SDPA_BACKENDS.items()],
        Provider("flex", _flex, available=compile_available, kind="compile", errors_are_skips=True),
        Provider("flash_attn", _flash_attn, importable("flash_attn"), kind="peer"),
    ]


def suites(cfg: Config) -> List[Suite]:
    train, decode = [], []
    seqs, dims = _train_sizes(cfg)
    for dt in cfg.dtypes:
        for E in dims:
            for causal in (False, True):
                for S in seqs:
                    B, H = max(1, 16384 // S), max(1, 2048 // E)
                    if cfg.size == "tiny":
                        B, H = 1, 2
                    fwd = 4.0 * B * H * S * S * E / (2 if causal else 1)
                    params = dict(B=B, H=H, L=S, S=S, E=E, causal=causal, decode=False)
                    train.append(Case(f"B={B} H={H} S={S}", S, dt, params,
                                      series=f"{'causal' if causal else 'non-causal'} hd={E}",
                                      flops={"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}))
        seqs_d, dims_d = _decode_sizes(cfg)
        for E in dims_d:
            for S in seqs_d:
                B, H = (1, 2) if cfg.size == "tiny" else (8, 2048 // E)
                params = dict(B=B, H=H, L=1, S=S, E=E, causal=False, decode=True)
                decode.append(Case(f"B={B} H={H} S={S}", S, dt, params, series=f"hd={E}",
                                   bytes={"fwd": nbytes(((2 * S + 2) * B * H * E, dt))},
                                   flops={"fwd": 4.0 * B * H * S * E}, modes=("fwd",)))
    baseline = "sdpa-flash" if cfg.cuda else "sdpa"
    return [
        Suite("attention", "TFLOP/s", train, _providers(cfg), baseline=baseline, xlabel="sequence length",
              description="softmax(QK^T/sqrt(E))V, q/k/v (B, H, S, E); is_causal top-left aligned."),
        Suite("attention_decode", "GB/s", decode, _providers(cfg), modes=("fwd",), baseline=baseline,
              xlabel="cached keys S",
              description="Decode: one query per sequence against S cached keys/values, not causal."),
    ]
