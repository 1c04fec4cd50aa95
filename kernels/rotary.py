"""Rotary position embedding (RoPE) of q and k in one launch, from given cos/sin tables.

Every rope variant a model computes (linear, dynamic NTK, llama3, yarn scaling) only changes the
tables, so the kernel takes them as given. q, k are read through their strides in the logical
(B, H, L, D) order, so (B, H, L, D) and (B, L, H, D) tensors (and views into a fused qkv
projection) run without copies; k may have fewer heads than q (GQA/MQA).

With R = the rotary dim (cos/sin's last dim, even, <= D) and h = R/2, the pair (x1_i, x2_i) of
element i < h is (x_i, x_{i+h}) in the half-rotation layout (GPT-NeoX, Llama: HF's rotate_half) and
(x_{2i}, x_{2i+1}) in the interleaved layout (GPT-J: rotate_every_two); c1, s1 / c2, s2 are the
tables' values at the first / second element's column:
    forward    y1 = x1 c1 - x2 s1         y2 = x2 c2 + x1 s2        (HF: x cos + rotate(x) sin)
    backward   dx1 = dy1 c1 + dy2 s2      dx2 = dy2 c2 - dy1 s1     (the transpose: BACKWARD flag)
Columns R..D (partial rotary, GPT-NeoX/Phi) pass through unchanged. Math in fp32 (fp64 for fp64
q/k), one rounding.

Launchers:
    rotary_forward(q, k, cos, sin, position_ids=None, interleaved=False) -> (q_out, k_out)
    rotary_backward(dq, dk, cos, sin, position_ids=None, interleaved=False) -> (dq_in, dk_in)
q, k here are in the logical (B, H, L, D) order (any strides); cos, sin (Bc, L, R) with Bc in {1, B}
or, with position_ids (B, L) / (1, L), tables (P, R) gathered at the ids.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import acc_dtype

MAX_HEAD_DIM = 1024  # one program holds (BLOCK_H, next_pow2(D)) of one token


@triton.jit
def _rotate_heads(
    X, OUT, H,                 # input, output (logical (B, H, L, D)); heads of this tensor
    b, t,                      # this program's token
    sx_b, sx_h, sx_l, sx_d,    # input strides
    so_b, so_h, so_l, so_d,    # output strides
    c1, s1, c2, s2,            # (1, BLOCK_R2) table values (in ACC) of the pairs' two columns
    col1, col2, pair_ok,       # (BLOCK_R2,) the pairs' columns, mask
    cols_p, pass_ok,           # (BLOCK_P,) pass-through columns R..D, mask
    BACKWARD: tl.constexpr, HAS_PASS: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr,
):
    x_tok = X + b * sx_b + t * sx_l
    o_tok = OUT + b * so_b + t * so_l
    for h0 in range(0, H, BLOCK_H):
        heads = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        m = (heads < H)[:, None] & pair_ok[None, :]
        xh = x_tok + heads[:, None] * sx_h
        oh = o_tok + heads[:, None] * so_h
        x1 = tl.load(xh + col1[None, :] * sx_d, mask=m, other=0.0).to(ACC)
        x2 = tl.load(xh + col2[None, :] * sx_d, mask=m, other=0.0).to(ACC)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(oh + col1[None, :] * so_d, y1.to(OUT.dtype.element_ty), mask=m)
        tl.store(oh + col2[None, :] * so_d, y2.to(OUT.dtype.element_ty), mask=m)
        if HAS_PASS:
            mp = (heads < H)[:, None] & pass_ok[None, :]
            xp = tl.load(xh + cols_p[None, :] * sx_d, mask=mp, other=0.0)
            tl.store(oh + cols_p[None, :] * so_d, xp, mask=mp)


@triton.jit
def _rotary_fwd_kernel(
    Q, K, QO, KO,              # q, k and the outputs, logical (B, H, L, D)
    COS, SIN, POS,             # tables (Bc, L, R) or (P, R) with POS; position ids (B, L) int64
    L, HQ, HK, R, D, P,        # sizes; P = table rows (position ids are checked against it)
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d,
    sqo_b, sqo_h, sqo_l, sqo_d, sko_b, sko_h, sko_l, sko_d,
    sc_b, sc_l, sc_r,          # table strides (sc_b 0 when shared over the batch, unused with POS)
    sp_b, sp_l,                # position id strides (sp_b 0 for shared ids)
    HAS_POS: tl.constexpr, INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr,
    HAS_PASS: tl.constexpr,    # R < D: columns R..D are copied
    ACC: tl.constexpr,         # fp32 (fp64 for fp64 q/k)
    BLOCK_H: tl.constexpr, BLOCK_R2: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program per token (b, t): its table row is read once and applied to every q and k head.
    tok = tl.program_id(0).to(tl.int64)
    b = tok // L
    t = tok % L
    if HAS_POS:
        row = tl.load(POS + b * sp_b + t * sp_l).to(tl.int64)
        row = tl.minimum(tl.maximum(row, 0), P - 1)  # ids were checked on the host; never read OOB
        c_tok = row * sc_l
    else:
        c_tok = b * sc_b + t * sc_l
    i = tl.arange(0, BLOCK_R2)
    pair_ok = i < R // 2
    if INTERLEAVED:
        col1 = 2 * i
        col2 = 2 * i + 1
    else:
        col1 = i
        col2 = i + R // 2
    c1 = tl.load(COS + c_tok + col1 * sc_r, mask=pair_ok, other=0.0).to(ACC)[None, :]
    s1 = tl.load(SIN + c_tok + col1 * sc_r, mask=pair_ok, other=0.0).to(ACC)[None, :]
    c2 = tl.load(COS + c_tok + col2 * sc_r, mask=pair_ok, other=0.0).to(ACC)[None, :]
    s2 = tl.load(SIN + c_tok + col2 * sc_r, mask=pair_ok, other=0.0).to(ACC)[None, :]
    cols_p = R + tl.arange(0, BLOCK_P)
    pass_ok = cols_p < D
    _rotate_heads(Q, QO, HQ, b, t, sq_b, sq_h, sq_l, sq_d, sqo_b, sqo_h, sqo_l, sqo_d,
                  c1, s1, c2, s2, col1, col2, pair_ok, cols_p, pass_ok, BACKWARD, HAS_PASS, BLOCK_H, ACC)
    _rotate_heads(K, KO, HK, b, t, sk_b, sk_h, sk_l, sk_d, sko_b, sko_h, sko_l, sko_d,
                  c1, s1, c2, s2, col1, col2, pair_ok, cols_p, pass_ok, BACKWARD, HAS_PASS, BLOCK_H, ACC)


def _out_like(t: torch.Tensor) -> torch.Tensor:
    # torch.empty_like keeps a dense input's strides (so a (B, L, H, D) tensor viewed as
    # (B, H, L, D) gets an output of the same layout); a non-dense view gets a contiguous one
    return torch.empty_like(t)


def _launch(q, k, cos, sin, position_ids, interleaved, backward):
    B, HQ, L, D = q.shape
    HK = k.shape[1]
    R = cos.shape[-1]
    assert R % 2 == 0 and R <= D and D <= MAX_HEAD_DIM, (R, D)
    qo, ko = _out_like(q), _out_like(k)
    if q.numel() + k.numel() == 0 or B * L == 0:
        return qo, ko
    if position_ids is not None:
        assert cos.dim() == 2 and position_ids.dim() == 2, (cos.shape, position_ids.shape)
        sc = (0, cos.stride(0), cos.stride(1))
        sp = (position_ids.stride(0) if position_ids.shape[0] > 1 else 0, position_ids.stride(1))
        P = cos.shape[0]
    else:
        assert cos.dim() == 3, cos.shape
        sc = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), cos.stride(2))
        sp = (0, 0)
        P = 1
    assert sin.stride() == cos.stride() and sin.shape == cos.shape, "cos and sin share a layout"
    block_r2 = triton.next_power_of_2(max(R // 2, 1))
    block_p = triton.next_power_of_2(max(D - R, 1))
    block_h = max(1, min(triton.next_power_of_2(max(HQ, HK)), 4096 // max(block_r2, block_p)))
    _rotary_fwd_kernel[(B * L,)](
        q, k, qo, ko, cos, sin, position_ids if position_ids is not None else cos,
        L, HQ, HK, R, D, P,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(), *sc, *sp,
        HAS_POS=position_ids is not None, INTERLEAVED=interleaved, BACKWARD=backward,
        HAS_PASS=R < D, ACC=acc_dtype(q.dtype), BLOCK_H=block_h, BLOCK_R2=block_r2, BLOCK_P=block_p,
        num_warps=4,
    )
    return qo, ko


def rotary_forward(q, k, cos, sin, position_ids: Optional[torch.Tensor] = None, interleaved=False):
    """(q_out, k_out) = RoPE(q), RoPE(k); q (B, Hq, L, D), k (B, Hk, L, D) in the logical order,
    any strides; outputs in q's / k's dtype and (when dense) layout."""
    return _launch(q, k, cos, sin, position_ids, interleaved, backward=False)


def rotary_backward(dq, dk, cos, sin, position_ids: Optional[torch.Tensor] = None, interleaved=False):
    """(dq_in, dk_in): the transposed rotation of the output gradients (shapes as the forward)."""
    return _launch(dq, dk, cos, sin, position_ids, interleaved, backward=True)


def compile_variants(quick: bool):
    """Both layouts, full and partial rotary, with and without position ids, forward and backward,
    per dtype (tools/gpu_compile_check.py compiles them for a GPU target)."""
    dtypes = [torch.float16, torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    for dt in dtypes:
        for D, R in ((128, 128), (80, 32)) if quick else ((64, 64), (128, 128), (80, 32), (256, 64)):
            q = torch.randn(2, 8, 16, D, dtype=dt)          # (B, H, L, D)
            k = torch.randn(2, 16, 2, D, dtype=dt).transpose(1, 2)  # a (B, L, H, D) tensor's view
            cos, sin = torch.randn(2, 16, R), torch.randn(2, 16, R)
            for interleaved in (False, True):
                rotary_forward(q, k, cos, sin, None, interleaved)
                rotary_backward(q, k, cos, sin, None, interleaved)
            ids = torch.randint(0, 64, (1, 16))
            table = torch.randn(64, R)
            rotary_forward(q, k, table, table, ids, False)
            rotary_backward(q, k, table, table, ids, False)
