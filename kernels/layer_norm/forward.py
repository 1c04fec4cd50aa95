"""The forward kernel of LayerNorm / RMSNorm and the fused residual + dropout sub-layer (see __init__.py)."""
from __future__ import annotations

import triton
import triton.language as tl

from .._math import dropout_keep


# ----------------------------------------------------------------------------------------------
# Sums of squares that cannot overflow. fp32 squares overflow past |v| ~ 1.8e19 (a row of +-1e20
# has a finite, exact answer: +-1), so each lane keeps its sum as acc * s^2 with s = 1 unless a
# value above _SQ_SAFE was seen, then s = the largest |value| so far (acc rescaled as s grows,
# online). For ordinary rows s stays 1 and every operation below is exact (x / 1, x * 1): the
# results are bit-identical to the plain sum of squares. N * _SQ_SAFE^2 stays far below fp32's max.
# ----------------------------------------------------------------------------------------------
_SQ_SAFE = tl.constexpr(1e16)


@triton.jit
def _add_squares(acc, s, v):
    """Per-lane (acc, s) after adding v^2 to the running sum of squares acc * s^2."""
    a = tl.abs(v)
    s_new = tl.maximum(s, tl.where(a > _SQ_SAFE, a, 1.0))
    r = s / s_new
    vs = v / s_new
    return acc * r * r + vs * vs, s_new


@triton.jit
def _rstd(acc, s, N, eps, shift):
    """1 / sqrt(mean(v^2) - shift^2 + eps) per row from the lanes' (acc, s) (BLOCK_M, BLOCK_N);
    shift is the centring correction d = mean(h - m) of the two-pass variance (0 for none)."""
    S = tl.max(s, axis=1)  # (BLOCK_M,) the row's scale
    r = s / S[:, None]
    ms = tl.sum(acc * r * r, axis=1) / N  # mean square / S^2
    ds = shift / S
    return 1.0 / (S * tl.sqrt(ms - ds * ds + eps / (S * S)))


@triton.jit
def _load_h(
    X, R, KEEP,                # input, residual, keep-mask output (test hook)
    rows, cols, M, N,          # (BLOCK_M,) int64 row and (BLOCK_N,) column indices; sizes
    stride_x, stride_r,        # row strides
    seed, p, scale,            # dropout: Philox seed, drop probability, 1/(1-p) (0 when p == 1)
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_MASK: tl.constexpr,
    ACC: tl.constexpr,         # accumulator dtype (fp32, or fp64 for fp64 inputs)
    ROUND_H: tl.constexpr,     # round h to H_DTYPE (the stored h's dtype) before returning it
    H_DTYPE: tl.constexpr,
):
    """h = residual + dropout(x) for a (BLOCK_M, BLOCK_N) tile, in ACC; 0 outside the tensor."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    h = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_DROPOUT:
        # idx = flat element index of the (rows, N) input: the mask the stand-alone dropout
        # kernel draws for the same seed. Multiply (not select) so a dropped NaN stays NaN as
        # in torch's x * mask * scale.
        idx = rows[:, None] * N + cols[None, :]
        keep = dropout_keep(seed, 0, idx, p)
        h = h * tl.where(keep, scale, 0.0).to(ACC)
        if STORE_MASK:
            tl.store(KEEP + idx, keep.to(tl.int8), mask=mask)
    if HAS_RESIDUAL:
        h += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(ACC)
    if ROUND_H:
        h = h.to(H_DTYPE).to(ACC)
    return h


@triton.jit
def _affine(y, W, B, c, N, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
            CAST_XHAT: tl.constexpr, XHAT_DTYPE: tl.constexpr, WEIGHT_PLUS_ONE: tl.constexpr):
    """xhat (BLOCK_M, BLOCK_N) -> xhat * w + b, with the casting order's flags (see the top)."""
    if CAST_XHAT:
        y = y.to(XHAT_DTYPE).to(y.dtype)  # Llama: round the normalized value to h's dtype first
    if HAS_WEIGHT:
        w = tl.load(W + c, mask=c < N, other=0.0).to(y.dtype)
        if WEIGHT_PLUS_ONE:
            w = w + 1.0  # Gemma: (1 + w), in fp32
        y = y * w[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + c, mask=c < N, other=0.0).to(y.dtype)[None, :]
    return y


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B,                # input (M, N), residual (M, N), weight (N,), bias (N,)
    Y, H, KEEP,                # outputs: y (M, N), h (M, N), keep mask int8 (M, N)
    Mean, Rstd,                # saved statistics (M,), fp32 (fp64 for fp64 inputs); no Mean for RMS
    stride_x, stride_r,        # row strides (elements) of X and R; columns are contiguous
    stride_y, stride_h,        # row strides of Y and H
    M, N,                      # rows, row length
    eps,                       # added to the variance
    SEED, p, scale,            # dropout: (1,) int64 Philox seed read on the device, p, 1/(1-p)
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_H: tl.constexpr,
    STORE_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_RMS_NORM: tl.constexpr,    # rstd = 1/sqrt(mean(h^2) + eps), xhat = h * rstd (no mean)
    ROUND_H: tl.constexpr,        # normalize h rounded to H's dtype (as an unfused add stores it)
    CAST_XHAT: tl.constexpr, XHAT_DTYPE: tl.constexpr,  # Llama: xhat.to(XHAT_DTYPE) before * w
    WEIGHT_PLUS_ONE: tl.constexpr,  # Gemma: * (1 + w)
    SINGLE_BLOCK: tl.constexpr,  # the whole row fits in one BLOCK_N (else loop over chunks)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per BLOCK_M rows. Statistics in ACC (fp32 at least); the LayerNorm variance is
    # taken from centred values, mean((h - mean)^2), never E[h^2] - E[h]^2, so a large common
    # offset (h ~ 1000 + noise) loses no accuracy. RMSNorm's mean(h^2) has no such cancellation.
    ACC: tl.constexpr = Rstd.dtype.element_ty
    if HAS_DROPOUT:
        seed = tl.load(SEED)  # on the device: a CUDA graph replay's new draw takes effect
    else:
        seed = 0
    H_DTYPE: tl.constexpr = H.dtype.element_ty
    # int64 rows: row * stride can exceed 2^31
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        mask = row_ok[:, None] & (cols < N)[None, :]
        h = _load_h(X, R, KEEP, rows, cols, M, N, stride_x, stride_r, seed, p, scale,
                    HAS_RESIDUAL, HAS_DROPOUT, STORE_MASK, ACC, ROUND_H, H_DTYPE)  # (BLOCK_M, BLOCK_N)
        if STORE_H:
            tl.store(H + rows[:, None] * stride_h + cols[None, :], h.to(H_DTYPE), mask=mask)
        ones = tl.full([BLOCK_M, BLOCK_N], 1.0, ACC)
        zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        if IS_RMS_NORM:
            sq, sc = _add_squares(zeros, ones, h)  # h is 0 outside the row
            rstd = _rstd(sq, sc, N, eps, 0.0)
            y = h * rstd[:, None]
        else:
            mean = tl.sum(h, axis=1) / N  # (BLOCK_M,)
            # One correction step: the sum above rounds at the scale of |h| (e.g. 1000), the
            # centred sum at the scale of the spread, so mean + mean(h - mean) is accurate to the
            # spread's precision; y = (h - mean) * rstd would carry the first mean's error * rstd.
            mean += tl.sum(tl.where(mask, h - mean[:, None], 0.0), axis=1) / N
            hc = tl.where(mask, h - mean[:, None], 0.0)
            sq, sc = _add_squares(zeros, ones, hc)  # var = mean(hc^2), overflow-safe
            rstd = _rstd(sq, sc, N, eps, 0.0)
            y = hc * rstd[:, None]
        y = _affine(y, W, B, cols, N, HAS_WEIGHT, HAS_BIAS, CAST_XHAT, XHAT_DTYPE, WEIGHT_PLUS_ONE)
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Long rows (BLOCK_M == 1): passes over the row, recomputing h (and regenerating the same
        # dropout mask) each time instead of keeping it. LayerNorm: 1) mean (and the h / mask
        # stores), 2) variance from centred values, 3) normalize and store. RMSNorm: 1) mean(h^2)
        # (and the stores), 3) normalize and store.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        sc = tl.full([BLOCK_M, BLOCK_N], 1.0, ACC)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            h = _load_h(X, R, KEEP, rows, c, M, N, stride_x, stride_r, seed, p, scale,
                        HAS_RESIDUAL, HAS_DROPOUT, STORE_MASK, ACC, ROUND_H, H_DTYPE)
            if STORE_H:
                tl.store(H + rows[:, None] * stride_h + c[None, :], h.to(H_DTYPE),
                         mask=row_ok[:, None] & (c < N)[None, :])
            if IS_RMS_NORM:
                acc, sc = _add_squares(acc, sc, h)
            else:
                acc += h
        if IS_RMS_NORM:
            mean = tl.zeros([BLOCK_M], dtype=ACC)
            rstd = _rstd(acc, sc, N, eps, 0.0)
        else:
            mean = tl.sum(acc, axis=1) / N
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                h = _load_h(X, R, KEEP, rows, c, M, N, stride_x, stride_r, seed, p, scale,
                            HAS_RESIDUAL, HAS_DROPOUT, False, ACC, ROUND_H, H_DTYPE)
                hc = tl.where(row_ok[:, None] & (c < N)[None, :], h - mean[:, None], 0.0)
                acc += hc
                acc2, sc = _add_squares(acc2, sc, hc)
            # The corrected two-pass formula: with d = mean(h - m) for the first estimate m,
            # mean = m + d and var = mean((h - m)^2) - d^2 (the single-block path's correction).
            d = tl.sum(acc, axis=1) / N
            mean += d
            rstd = _rstd(acc2, sc, N, eps, d)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            m = row_ok[:, None] & (c < N)[None, :]
            h = _load_h(X, R, KEEP, rows, c, M, N, stride_x, stride_r, seed, p, scale,
                        HAS_RESIDUAL, HAS_DROPOUT, False, ACC, ROUND_H, H_DTYPE)
            y = (h - mean[:, None]) * rstd[:, None]
            y = _affine(y, W, B, c, N, HAS_WEIGHT, HAS_BIAS, CAST_XHAT, XHAT_DTYPE, WEIGHT_PLUS_ONE)
            tl.store(Y + rows[:, None] * stride_y + c[None, :], y.to(Y.dtype.element_ty), mask=m)
    if not IS_RMS_NORM:
        tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)
