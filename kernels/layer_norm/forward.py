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
    X, R, KEEP, H,             # input, residual, keep-mask output (test hook), h output
    rows, cols, M, N,          # (BLOCK_M,) int64 row and (BLOCK_N,) column indices; sizes
    stride_x, stride_r, stride_h,  # row strides
    seed, p, scale,            # dropout: Philox seed, drop probability, 1/(1-p) (0 when p == 1)
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_MASK: tl.constexpr,
    STORE_H: tl.constexpr,     # also store h (in H_DTYPE)
    ACC: tl.constexpr,         # accumulator dtype (fp32, or fp64 for fp64 inputs)
    ROUND_H: tl.constexpr,     # round h to H_DTYPE (the stored h's dtype) before returning it
    H_DTYPE: tl.constexpr,
):
    """h = residual + dropout(x) for a (BLOCK_M, BLOCK_N) tile, in ACC; 0 outside the tensor. Its
    side outputs where asked: the keep mask (STORE_MASK) and h itself (STORE_H)."""
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
    if STORE_H:
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h.to(H_DTYPE), mask=mask)
    return h


@triton.jit
def _load_wb(W, B, c, N, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
             WEIGHT_PLUS_ONE: tl.constexpr):
    """(w, b) of the columns c, in ACC (Gemma: 1 + w); zeros for an absent one (never used then)."""
    w = tl.zeros(c.shape, dtype=ACC)
    b = tl.zeros(c.shape, dtype=ACC)
    if HAS_WEIGHT:
        w = tl.load(W + c, mask=c < N, other=0.0).to(ACC)
        if WEIGHT_PLUS_ONE:
            w = w + 1.0  # Gemma: (1 + w), in fp32
    if HAS_BIAS:
        b = tl.load(B + c, mask=c < N, other=0.0).to(ACC)
    return w, b


@triton.jit
def _affine(y, w, b, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
            CAST_XHAT: tl.constexpr, XHAT_DTYPE: tl.constexpr):
    """xhat (BLOCK_M, BLOCK_N) -> xhat * w + b (w, b from _load_wb), with the casting order's flags."""
    if CAST_XHAT:
        y = y.to(XHAT_DTYPE).to(y.dtype)  # Llama: round the normalized value to h's dtype first
    if HAS_WEIGHT:
        y = y * w[None, :]
    if HAS_BIAS:
        y = y + b[None, :]
    return y


@triton.jit
def _welford_lanes(n, mean, m2, s, h, ok):
    """Per-lane Welford update with one more value h where ok: count n, mean, and the sum of squared
    deviations kept as m2 * s^2 (s as in _add_squares, so that values past 1e16 cannot overflow)."""
    n_new = n + tl.where(ok, 1.0, 0.0)
    d = tl.where(ok, h - mean, 0.0)
    mean_new = mean + d / tl.maximum(n_new, 1.0)
    e = tl.where(ok, h - mean_new, 0.0)
    a = tl.maximum(tl.abs(d), tl.abs(e))
    s_new = tl.maximum(s, tl.where(a > _SQ_SAFE, a, 1.0))
    r = s / s_new
    return n_new, mean_new, m2 * r * r + (d / s_new) * (e / s_new), s_new


@triton.jit
def _welford_rows(n, mean, m2, s):
    """Per row, (count, mean, M2 / S^2, S) of the lanes' Welford states (BLOCK_M, BLOCK_N), merged
    as Chan et al.: mean = sum(n_l mean_l) / count, corrected by sum(n_l (mean_l - mean)) / count
    (the single-block path's correction step), M2 = sum(m2_l) + sum(n_l (mean_l - mean)^2), all
    squares scaled by the row's S."""
    cnt = tl.sum(n, axis=1)
    inv = 1.0 / tl.maximum(cnt, 1.0)
    mean_r = tl.sum(n * mean, axis=1) * inv
    dl = tl.where(n > 0, mean - mean_r[:, None], 0.0)
    mean_r += tl.sum(n * dl, axis=1) * inv
    dl = tl.where(n > 0, mean - mean_r[:, None], 0.0)
    a = tl.abs(dl)
    S = tl.maximum(tl.max(s, axis=1), tl.max(tl.where(a > _SQ_SAFE, a, 1.0), axis=1))
    r = s / S[:, None]
    ds = dl / S[:, None]
    return cnt, mean_r, tl.sum(m2 * r * r, axis=1) + tl.sum(n * ds * ds, axis=1), S


@triton.jit
def _squares_row(acc, s):
    """Per row, (sum of squares / S^2, S) of the lanes' (acc, s) from _add_squares."""
    S = tl.max(s, axis=1)
    r = s / S[:, None]
    return tl.sum(acc * r * r, axis=1), S


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B,                # input (M, N), residual (M, N), weight (N,), bias (N,)
    Y, H, KEEP,                # outputs: y (M, N), h (M, N), keep mask int8 (M, N)
    Mean, Rstd,                # saved statistics (M,), fp32 (fp64 for fp64 inputs); no Mean for RMS
    stride_x, stride_r,        # row strides (elements) of X and R; columns are contiguous
    stride_y, stride_h,        # row strides of Y and H
    M, N,                      # rows, row length
    rows_per_program,          # each program normalizes rows [pid * this, (pid + 1) * this), a multiple of BLOCK_M
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
    HOLD: tl.constexpr,           # long rows: the first HOLD columns held in registers (HOLD < N)
):
    # Each program owns a contiguous group of rows and walks it BLOCK_M rows at a time; the weight
    # and bias are loaded once per program (per chunk, for long rows) and held across its rows.
    # Statistics in ACC (fp32 at least); the LayerNorm variance is taken from centred values,
    # never E[h^2] - E[h]^2, so a large common offset (h ~ 1000 + noise) loses no accuracy.
    # RMSNorm's mean(h^2) has no such cancellation.
    ACC: tl.constexpr = Rstd.dtype.element_ty
    if HAS_DROPOUT:
        seed = tl.load(SEED)  # on the device: a CUDA graph replay's new draw takes effect
    else:
        seed = 0
    H_DTYPE: tl.constexpr = H.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)  # int64 rows: row * stride can exceed 2^31
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        w, b = _load_wb(W, B, cols, N, ACC, HAS_WEIGHT, HAS_BIAS, WEIGHT_PLUS_ONE)
        for tile in range(row_start, row_end, BLOCK_M):
            rows = tl.arange(0, BLOCK_M).to(tl.int64) + tile  # int64 whatever the loop var is
            row_ok = rows < row_end
            mask = row_ok[:, None] & (cols < N)[None, :]
            h = _load_h(X, R, KEEP, H, rows, cols, row_end, N, stride_x, stride_r, stride_h, seed, p, scale,
                        HAS_RESIDUAL, HAS_DROPOUT, STORE_MASK, STORE_H, ACC, ROUND_H, H_DTYPE)  # (BLOCK_M, BLOCK_N)
            ones = tl.full([BLOCK_M, BLOCK_N], 1.0, ACC)
            zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            if IS_RMS_NORM:
                sq, sc = _add_squares(zeros, ones, h)  # h is 0 outside the row
                rstd = _rstd(sq, sc, N, eps, 0.0)
                y = h * rstd[:, None]
            else:
                mean = tl.sum(h, axis=1) / N  # (BLOCK_M,)
                # One correction step: the sum above rounds at the scale of |h| (e.g. 1000), the
                # centred sum at the scale of the spread, so mean + mean(h - mean) is accurate to
                # the spread's precision; y = (h - mean) * rstd would carry the first mean's error.
                mean += tl.sum(tl.where(mask, h - mean[:, None], 0.0), axis=1) / N
                hc = tl.where(mask, h - mean[:, None], 0.0)
                sq, sc = _add_squares(zeros, ones, hc)  # var = mean(hc^2), overflow-safe
                rstd = _rstd(sq, sc, N, eps, 0.0)
                y = hc * rstd[:, None]
                tl.store(Mean + rows, mean, mask=row_ok)
            tl.store(Rstd + rows, rstd, mask=row_ok)
            y = _affine(y, w, b, HAS_WEIGHT, HAS_BIAS, CAST_XHAT, XHAT_DTYPE)
            tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Long rows, two passes over the program's rows. 1) per BLOCK_M rows, the statistics in one
        # sweep over the row's chunks past the first HOLD columns (LayerNorm: per-lane Welford;
        # RMSNorm: mean(h^2)), then the first HOLD columns as one (BLOCK_M, HOLD) tile, merged with
        # the lanes (Chan et al.) and, still in registers, normalized and stored (their weight and
        # bias loaded once per program); the h / mask stores; mean and rstd stored. 2) chunk by
        # chunk over the columns past HOLD, the chunk's weight and bias loaded once and every row of
        # the program normalized: h read back where it was stored exactly as normalized (READ_H),
        # else recomputed (the same dropout mask regenerated); mean and rstd read back. Traffic:
        # the input read 2 - HOLD / N times (h written and read back instead of x and the residual
        # read again, under READ_H), the output written once, weight and bias once per program.
        # READ_H: the stored h is bit-identical to the ACC h normalized: rounded to H's dtype first
        # (ROUND_H), or H's dtype is ACC.
        READ_H: tl.constexpr = STORE_H and (ROUND_H or H_DTYPE == ACC)
        hcols = tl.arange(0, HOLD)
        wh, bh = _load_wb(W, B, hcols, N, ACC, HAS_WEIGHT, HAS_BIAS, WEIGHT_PLUS_ONE)
        for tile in range(row_start, row_end, BLOCK_M):
            rows = tl.arange(0, BLOCK_M).to(tl.int64) + tile  # int64 whatever the loop var is
            row_ok = rows < row_end
            n = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            mu = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            sc = tl.full([BLOCK_M, BLOCK_N], 1.0, ACC)
            for start in range(HOLD, N, BLOCK_N):
                c = start + cols
                ok = row_ok[:, None] & (c < N)[None, :]
                h = _load_h(X, R, KEEP, H, rows, c, row_end, N, stride_x, stride_r, stride_h, seed, p, scale,
                            HAS_RESIDUAL, HAS_DROPOUT, STORE_MASK, STORE_H, ACC, ROUND_H, H_DTYPE)
                if IS_RMS_NORM:
                    acc, sc = _add_squares(acc, sc, h)
                else:
                    n, mu, acc, sc = _welford_lanes(n, mu, acc, sc, h, ok)
            # the lanes reduced to per-row values before the held tile is loaded (fewer live registers)
            if IS_RMS_NORM:
                q_a, s_a = _squares_row(acc, sc)
            else:
                n_a, mean_a, q_a, s_a = _welford_rows(n, mu, acc, sc)
            hok = row_ok[:, None] & (hcols < N)[None, :]
            hh = _load_h(X, R, KEEP, H, rows, hcols, row_end, N, stride_x, stride_r, stride_h, seed, p, scale,
                         HAS_RESIDUAL, HAS_DROPOUT, STORE_MASK, STORE_H, ACC, ROUND_H, H_DTYPE)  # (BLOCK_M, HOLD)
            ones = tl.full([BLOCK_M, HOLD], 1.0, ACC)
            zeros = tl.zeros([BLOCK_M, HOLD], dtype=ACC)
            if IS_RMS_NORM:
                acc2, sc2 = _add_squares(zeros, ones, hh)
                q_h, s_h = _squares_row(acc2, sc2)
                S = tl.maximum(s_a, s_h)
                ra = s_a / S
                rh = s_h / S
                rstd = 1.0 / (S * tl.sqrt((q_a * ra * ra + q_h * rh * rh) / N + eps / (S * S)))
                y = hh * rstd[:, None]
            else:
                # the held tile's mean and centred squares as the single-block path takes them,
                # merged with the lanes' (count n_a): mean = mean_a + d HOLD / N,
                # M2 = M2_a + M2_h + d^2 n_a HOLD / N with d = mean_h - mean_a (Chan et al.)
                mean_h = tl.sum(hh, axis=1) / HOLD
                mean_h += tl.sum(hh - mean_h[:, None], axis=1) / HOLD
                acc2, sc2 = _add_squares(zeros, ones, hh - mean_h[:, None])
                q_h, s_h = _squares_row(acc2, sc2)
                d = mean_h - mean_a
                mean = mean_a + d * HOLD / N  # in ACC: HOLD / N alone is an fp32 quotient
                ad = tl.abs(d)
                S = tl.maximum(tl.maximum(s_a, s_h), tl.where(ad > _SQ_SAFE, ad, 1.0))
                ra = s_a / S
                rh = s_h / S
                ds = d / S
                ms = (q_a * ra * ra + q_h * rh * rh + ds * ds * (n_a * HOLD / N)) / N
                rstd = 1.0 / (S * tl.sqrt(ms + eps / (S * S)))
                y = (hh - mean[:, None]) * rstd[:, None]
                tl.store(Mean + rows, mean, mask=row_ok)
            tl.store(Rstd + rows, rstd, mask=row_ok)
            y = _affine(y, wh, bh, HAS_WEIGHT, HAS_BIAS, CAST_XHAT, XHAT_DTYPE)
            tl.store(Y + rows[:, None] * stride_y + hcols[None, :], y.to(Y.dtype.element_ty), mask=hok)
        # pass 2 reads the statistics (and h) this program stored in pass 1 (from other threads)
        tl.debug_barrier()
        for start in range(HOLD, N, BLOCK_N):
            c = start + cols
            w, b = _load_wb(W, B, c, N, ACC, HAS_WEIGHT, HAS_BIAS, WEIGHT_PLUS_ONE)
            for tile in range(row_start, row_end, BLOCK_M):
                rows = tl.arange(0, BLOCK_M).to(tl.int64) + tile  # int64 whatever the loop var is
                row_ok = rows < row_end
                m = row_ok[:, None] & (c < N)[None, :]
                rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
                if READ_H:
                    h = tl.load(H + rows[:, None] * stride_h + c[None, :], mask=m, other=0.0).to(ACC)
                else:
                    h = _load_h(X, R, KEEP, H, rows, c, row_end, N, stride_x, stride_r, stride_h, seed, p, scale,
                                HAS_RESIDUAL, HAS_DROPOUT, False, False, ACC, ROUND_H, H_DTYPE)
                if IS_RMS_NORM:
                    y = h * rstd[:, None]
                else:
                    mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
                    y = (h - mean[:, None]) * rstd[:, None]
                y = _affine(y, w, b, HAS_WEIGHT, HAS_BIAS, CAST_XHAT, XHAT_DTYPE)
                tl.store(Y + rows[:, None] * stride_y + c[None, :], y.to(Y.dtype.element_ty), mask=m)
