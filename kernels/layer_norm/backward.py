"""The backward kernel of LayerNorm / RMSNorm and the fused sub-layer (the math below; see __init__.py)."""
from __future__ import annotations

import triton
import triton.language as tl

from .._math import dropout_keep


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
# With xhat = (h - mean) * rstd, y = xhat * w + b, g = dy * w (g = dy without a weight), and
# means over the row's N columns:
#     dxhat/dh_j = rstd (delta_ij - 1/N - xhat_i xhat_j / N)
#     dh = rstd * (g - mean(g) - xhat * mean(xhat * g))
#     dweight = sum_rows dy * xhat,     dbias = sum_rows dy
# RMSNorm (mean = 0, xhat = h * rstd, rstd = 1/sqrt(mean(h^2) + eps)) drops the mean(g) term:
#     dh = rstd * (g - xhat * mean(xhat * g))
# and Gemma's (1 + w) is the weight in g; Llama's cast of xhat is rounding, its gradient the
# identity, so every casting order shares this backward.
# The fused op adds the gradient flowing into its second output h:  dh += dh_out.
# Then d_residual = dh and d_input = dh * keep / (1 - p) (the same mask, regenerated from the seed).
# dweight/dbias: each program sums its contiguous group of rows in fp32 registers into its own row
# of a (programs, N) buffer, written once; the launcher reduces that buffer in a fixed order. No
# atomics: two backward runs give bit-identical results. The weight is loaded once per program
# (per chunk, for long rows) and held across its rows.
@triton.jit
def _load_w(W, c, N, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, WEIGHT_PLUS_ONE: tl.constexpr):
    """The weight of the columns c in ACC (Gemma: 1 + w); ones without a weight (never used then)."""
    w = tl.full(c.shape, 1.0, ACC)
    if HAS_WEIGHT:
        w = tl.load(W + c, mask=c < N, other=0.0).to(ACC)
        if WEIGHT_PLUS_ONE:
            w = w + 1.0
    return w


@triton.jit
def _tile_g(
    X, w, DY, rows, cols, mask, stride_x, stride_dy, mean, rstd,
    HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
):
    """(xhat, dy, g = dy * w) of a (BLOCK_M, BLOCK_N) tile, in ACC, 0 outside the tensor."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_WEIGHT:
        g = dy * w[None, :]
    return xhat, dy, g


@triton.jit
def _tile_dx_and_partials(
    dw, db, xhat, dy, g, c1, c2, rstd,   # partials (BLOCK_N,); the tile's xhat, dy, g; per-row c1, c2, rstd
    DX, DH, DHO, rows, cols, mask, N, stride_dx, stride_dh, stride_dho, seed, p, scale,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DH_OUT: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_DH: tl.constexpr,
):
    """One tile of the backward's second step: dh = (g - (xhat c1 + c2)) rstd (+ dh_out); store dh
    (the residual's gradient) and dx = dh * keep * scale; add the tile's columns to the fp32
    dweight / dbias partials (returned)."""
    dh = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    if HAS_DH_OUT:
        dh += tl.load(DHO + rows[:, None] * stride_dho + cols[None, :], mask=mask,
                      other=0.0).to(dh.dtype)
    if STORE_DH:
        tl.store(DH + rows[:, None] * stride_dh + cols[None, :], dh.to(DH.dtype.element_ty),
                 mask=mask)
    dx = dh
    if HAS_DROPOUT:
        keep = dropout_keep(seed, 0, rows[:, None] * N + cols[None, :], p)
        dx = dh * tl.where(keep, scale, 0.0).to(dh.dtype)
    tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        dw += tl.sum(dy * xhat, axis=0)
    if HAS_BIAS:
        db += tl.sum(dy, axis=0)
    return dw, db


@triton.jit
def _stats(Mean, Rstd, rows, row_ok, IS_RMS_NORM: tl.constexpr, ACC: tl.constexpr):
    """(mean, rstd) of the rows: the saved statistics (mean 0 for RMSNorm)."""
    if IS_RMS_NORM:
        mean = tl.zeros(rows.shape, dtype=ACC)
    else:
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    return mean, rstd


@triton.jit
def _layer_norm_bwd_kernel(
    X, W, DY, DHO,             # saved h (M, N), weight (N,), dy (M, N), dh_out (M, N)
    DX, DH,                    # outputs: d_input (M, N), d_residual = dh (M, N)
    DW, DB,                    # (programs, N) fp32 partial sums of dweight, dbias
    Mean, Rstd,                # saved statistics (M,); Mean unused for RMSNorm
    C,                         # long rows: (2, M) fp32 scratch for the row constants c1, c2
    stride_x, stride_dy, stride_dho, stride_dx, stride_dh,  # row strides, unit column stride
    M, N, rows_per_program,
    SEED, p, scale,            # dropout, as in the forward
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH_OUT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, STORE_DH: tl.constexpr,
    IS_RMS_NORM: tl.constexpr, WEIGHT_PLUS_ONE: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Each program owns rows [row_start, row_end) and walks them BLOCK_M at a time.
    ACC: tl.constexpr = Rstd.dtype.element_ty
    if HAS_DROPOUT:
        seed = tl.load(SEED)  # on the device: a CUDA graph replay's new draw takes effect
    else:
        seed = 0
    pid = tl.program_id(0).to(tl.int64)  # int64 rows: row * stride can exceed 2^31
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    DW += pid * N
    DB += pid * N
    if SINGLE_BLOCK:
        # The weight and the partial sums stay in registers across this program's rows.
        w = _load_w(W, cols, N, ACC, HAS_WEIGHT, WEIGHT_PLUS_ONE)
        dw = tl.zeros([BLOCK_N], dtype=ACC)
        db = tl.zeros([BLOCK_N], dtype=ACC)
        for tile in range(row_start, row_end, BLOCK_M):
            rows = tl.arange(0, BLOCK_M).to(tl.int64) + tile  # int64 whatever the loop var is
            row_ok = rows < row_end
            mask = row_ok[:, None] & (cols < N)[None, :]
            mean, rstd = _stats(Mean, Rstd, rows, row_ok, IS_RMS_NORM, ACC)
            xhat, dy, g = _tile_g(X, w, DY, rows, cols, mask, stride_x, stride_dy, mean, rstd,
                                  HAS_WEIGHT, ACC)
            c1 = tl.sum(xhat * g, axis=1) / N
            if IS_RMS_NORM:
                c2 = tl.zeros([BLOCK_M], dtype=ACC)
            else:
                c2 = tl.sum(g, axis=1) / N
            dw, db = _tile_dx_and_partials(dw, db, xhat, dy, g, c1, c2, rstd, DX, DH, DHO, rows, cols, mask, N,
                                           stride_dx, stride_dh, stride_dho, seed, p, scale, HAS_WEIGHT, HAS_BIAS,
                                           HAS_DH_OUT, HAS_DROPOUT, STORE_DH)
        if HAS_WEIGHT:
            tl.store(DW + cols, dw, mask=cols < N)
        if HAS_BIAS:
            tl.store(DB + cols, db, mask=cols < N)
    else:
        # Long rows, two passes over the program's rows. 1) per BLOCK_M rows, c1 and c2 in one
        # sweep over the row's chunks, stored in the scratch C. 2) chunk by chunk: the chunk's
        # weight loaded once, every row of the program's dh, dx stored, and the chunk's dweight /
        # dbias partial summed in fp32 registers across the rows and written once (no
        # read-modify-write). Traffic: h and dy read twice, dx written once.
        for tile in range(row_start, row_end, BLOCK_M):
            rows = tl.arange(0, BLOCK_M).to(tl.int64) + tile  # int64 whatever the loop var is
            row_ok = rows < row_end
            mean, rstd = _stats(Mean, Rstd, rows, row_ok, IS_RMS_NORM, ACC)
            a1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            a2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_ok[:, None] & (c < N)[None, :]
                w = _load_w(W, c, N, ACC, HAS_WEIGHT, WEIGHT_PLUS_ONE)
                xhat, dy, g = _tile_g(X, w, DY, rows, c, mask, stride_x, stride_dy, mean, rstd,
                                      HAS_WEIGHT, ACC)
                a1 += xhat * g
                a2 += g
            tl.store(C + rows, tl.sum(a1, axis=1) / N, mask=row_ok)
            if not IS_RMS_NORM:
                tl.store(C + M + rows, tl.sum(a2, axis=1) / N, mask=row_ok)
        # pass 2 reads the constants this program stored in pass 1 (from other threads)
        tl.debug_barrier()
        for start in range(0, N, BLOCK_N):
            c = start + cols
            w = _load_w(W, c, N, ACC, HAS_WEIGHT, WEIGHT_PLUS_ONE)
            dw = tl.zeros([BLOCK_N], dtype=ACC)
            db = tl.zeros([BLOCK_N], dtype=ACC)
            for tile in range(row_start, row_end, BLOCK_M):
                rows = tl.arange(0, BLOCK_M).to(tl.int64) + tile  # int64 whatever the loop var is
                row_ok = rows < row_end
                mask = row_ok[:, None] & (c < N)[None, :]
                mean, rstd = _stats(Mean, Rstd, rows, row_ok, IS_RMS_NORM, ACC)
                c1 = tl.load(C + rows, mask=row_ok, other=0.0)
                if IS_RMS_NORM:
                    c2 = tl.zeros([BLOCK_M], dtype=ACC)
                else:
                    c2 = tl.load(C + M + rows, mask=row_ok, other=0.0)
                xhat, dy, g = _tile_g(X, w, DY, rows, c, mask, stride_x, stride_dy, mean, rstd,
                                      HAS_WEIGHT, ACC)
                dw, db = _tile_dx_and_partials(dw, db, xhat, dy, g, c1, c2, rstd, DX, DH, DHO, rows, c, mask, N,
                                               stride_dx, stride_dh, stride_dho, seed, p, scale, HAS_WEIGHT,
                                               HAS_BIAS, HAS_DH_OUT, HAS_DROPOUT, STORE_DH)
            if HAS_WEIGHT:
                tl.store(DW + c, dw, mask=c < N)
            if HAS_BIAS:
                tl.store(DB + c, db, mask=c < N)
