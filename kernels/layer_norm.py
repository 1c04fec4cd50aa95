"""LayerNorm and RMSNorm, and the fused `h = residual + dropout(x); y = Norm(h)` sub-layer, in Triton.

The input is viewed as (rows, N), N = prod(normalized_shape); every row is normalized on its own.
One forward kernel and one backward kernel serve every op: the residual add, the dropout, the store
of h, the affine weight/bias, RMSNorm instead of LayerNorm (IS_RMS_NORM: no mean, rstd from
mean(h^2)) and the model families' casting orders are `tl.constexpr` flags, so a plain LayerNorm
compiles none of the other code.

RMSNorm casting orders (the `cast` argument of the rms_norm launchers), xhat = h * rstd in fp32:
    "torch"  y = (xhat * w).to(dtype(h))                    torch.nn.functional.rms_norm
    "llama"  y = xhat.to(dtype(h)) * w   (in promote(h, w))  HF Llama/Mistral/Qwen: CAST_XHAT
    "gemma"  y = (xhat * (1 + w)).to(dtype(h))              HF Gemma: WEIGHT_PLUS_ONE
With a residual, h = x + residual is rounded to its dtype before the statistics (ROUND_H), as the
unfused `h = x + residual; norm(h)` of a 16-bit model rounds it.

Launchers (tensors in, tensors out):
    layer_norm_forward(x, N, weight, bias, eps, residual=None, p=0.0, seed=0, store_h=False,
                   return_mask=False) -> (y, h, mean, rstd[, keep_mask])
    layer_norm_backward(dy, h, N, weight, bias, mean, rstd, dh_out=None, p=0.0, seed=0,
                   store_dh=False, dx_dtype=None) -> (dx, dh, dweight, dbias)
    rms_norm_forward(x, N, weight, eps, residual=None, cast="torch") -> (y, h, rstd)
    rms_norm_backward(dy, h, N, weight, rstd, dh_out=None, cast="torch", store_dh=False,
                      dx_dtype=None) -> (dx, dh, dweight)
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import as_rows, num_sms, row_config, seed_tensor, stat_dtype
from ._dtypes import LOW, RMS_NORM_CASTS
from ._math import dropout_keep

# Largest hidden size (N = prod(normalized_shape)) the launchers accept: the largest size the tests
# run. Nothing in the kernels breaks just above it (large rows loop over chunks), but untested sizes
# raise rather than risk a wrong answer.
MAX_HIDDEN = 65536
# Largest row held in registers at once. A GPU program has at most 16 warps (512 threads) of at
# most 255 32-bit registers each; the backward keeps ~6 fp32 values per column live (x, dy, w,
# dx, and the dweight/dbias partial sums), so 8192 columns is ~16 values per thread per array,
# already near the limit without spilling. Rows longer than this loop over chunks of
# MAX_BLOCK_N columns instead (SINGLE_BLOCK=False): a few more passes over the row (served
# mostly from L2), but no register spills and no size ceiling from the register file.
MAX_BLOCK_N = 8192


def calc_settings(N: int):
    """(BLOCK_M, BLOCK_N, num_warps, SINGLE_BLOCK) for rows of N elements (the shared row_config):
    one block up to MAX_BLOCK_N columns, else MAX_BLOCK_N-column chunks one row per tile; raises
    ValueError past MAX_HIDDEN (ops/layer_norm.py's `unsupported` falls back before that)."""
    return row_config(N, max_n=MAX_HIDDEN, block_n_cap=MAX_BLOCK_N, name="layer_norm")


def _num_programs(rows: int, block_m: int, device: torch.device) -> int:
    """Programs of the backward kernel, each owning a contiguous group of rows. One per SM keeps
    the (programs, N) fp32 partial-sum buffer small; it depends only on (rows, N, device), so the
    fixed-order reduction, and thus dweight/dbias, are bit-identical from run to run."""
    return max(1, min(triton.cdiv(rows, block_m), num_sms(device)))


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
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


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float32: tl.float32, torch.float64: tl.float64}
CASTS = RMS_NORM_CASTS  # RMSNorm casting orders (module docstring)


def _forward(x, N, weight, bias, eps, residual, p, seed, store_h, keep, out_dtype, h_dtype,
             rms=False, cast="torch"):
    """Allocate y (out_dtype), h (h_dtype, if store_h) and the statistics, and launch."""
    block_m, block_n, num_warps, single = calc_settings(N)
    weight = weight.contiguous() if weight is not None else None  # kernels index W + col
    bias = bias.contiguous() if bias is not None else None
    sdt = stat_dtype(h_dtype)
    rows = x.numel() // N if N > 0 else 0
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    h = torch.empty(x.shape, dtype=h_dtype, device=x.device) if store_h else None
    mean = None if rms else torch.empty(rows, dtype=sdt, device=x.device)
    rstd = torch.empty(rows, dtype=sdt, device=x.device)
    if x.numel() > 0:
        x2 = as_rows(x, N)  # (rows, N)
        r2 = as_rows(residual, N) if residual is not None else x2
        y2 = y.view(-1, N)
        h2 = h.view(-1, N) if store_h else y2
        low = h_dtype in LOW
        _layer_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
            x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
            y2, h2, keep if keep is not None else y2,
            mean if mean is not None else rstd, rstd,
            x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
            rows, N, eps,
            seed_tensor(seed, x.device) if p > 0.0 else rstd, p, 0.0 if p >= 1.0 else 1.0 / (1.0 - p),
            HAS_RESIDUAL=residual is not None, HAS_DROPOUT=p > 0.0, STORE_H=store_h,
            STORE_MASK=keep is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, IS_RMS_NORM=rms,
            ROUND_H=rms and residual is not None and low,
            CAST_XHAT=cast == "llama" and low, XHAT_DTYPE=_TL_DTYPE[h_dtype],
            WEIGHT_PLUS_ONE=cast == "gemma",
            SINGLE_BLOCK=single, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return y, h, mean, rstd


def layer_norm_forward(
    x: torch.Tensor,
    N: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    residual: Optional[torch.Tensor] = None,
    p: float = 0.0,
    seed=0,
    store_h: bool = False,
    return_mask: bool = False,
):
    """LayerNorm over the last N elements of x, optionally of h = residual + dropout(x, p).

    x (*, N-trailing), residual like x or None, weight/bias (N,)-shaped or None. Dropout is
    compiled in only when p > 0; its keep-mask is drawn from Philox (seed, offset 0) at the flat
    element index of x. Returns (y, h, mean, rstd): y and h like x (y in the dtype of h, which is
    torch.result_type(x, residual)), h None unless store_h; mean and rstd (rows,) fp32 (fp64 for
    fp64 input). return_mask=True (a test hook) appends the keep mask, bool like x (None without
    dropout). The caller validates shapes and dtypes."""
    out_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    keep = torch.empty(x.shape, dtype=torch.int8, device=x.device) if return_mask and p > 0.0 else None
    out = _forward(x, N, weight, bias, eps, residual, p, seed, store_h, keep, out_dtype, out_dtype)
    if return_mask:
        out = out + (keep.bool() if keep is not None else None,)
    return out


def rms_norm_out_dtype(h_dtype: torch.dtype, weight: Optional[torch.Tensor], cast: str) -> torch.dtype:
    """y's dtype: h's, except Llama's `weight * xhat.to(h.dtype)`, which promotes with the weight."""
    if cast == "llama" and weight is not None:
        return torch.promote_types(h_dtype, weight.dtype)
    return h_dtype


def rms_norm_forward(
    x: torch.Tensor,
    N: int,
    weight: Optional[torch.Tensor],
    eps: float,
    residual: Optional[torch.Tensor] = None,
    cast: str = "torch",
):
    """RMSNorm over the last N elements of x, or of h = x + residual (then h is also returned).

    x (*, N-trailing), residual like x or None, weight (N,)-shaped or None; cast in CASTS.
    Returns (y, h, rstd): h in torch.result_type(x, residual) (None without a residual), y in
    rms_norm_out_dtype(dtype of h, weight, cast), rstd (rows,) fp32 (fp64 for fp64 h). The caller
    validates shapes and dtypes."""
    assert cast in CASTS, cast
    h_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    y, h, _, rstd = _forward(x, N, weight, None, eps, residual, 0.0, 0, residual is not None, None,
                             rms_norm_out_dtype(h_dtype, weight, cast), h_dtype, rms=True, cast=cast)
    return y, h, rstd


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
# dweight/dbias: each program sums its contiguous group of rows in fp32 into its own row of a
# (programs, N) buffer; the launcher reduces that buffer in a fixed order. No atomics: two
# backward runs give bit-identical results.
@triton.jit
def _tile_g(
    X, W, DY, rows, cols, mask, N, stride_x, stride_dy, mean, rstd,
    HAS_WEIGHT: tl.constexpr, WEIGHT_PLUS_ONE: tl.constexpr, ACC: tl.constexpr,
):
    """(xhat, dy, g = dy * w) of a (BLOCK_M, BLOCK_N) tile, in ACC, 0 outside the tensor."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(ACC)
        if WEIGHT_PLUS_ONE:
            w = w + 1.0
        g = dy * w[None, :]
    return xhat, dy, g


@triton.jit
def _tile_store_dx(
    DX, DH, DHO, rows, cols, mask, N, stride_dx, stride_dh, stride_dho, dh, seed, p, scale,
    HAS_DH_OUT: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_DH: tl.constexpr,
):
    """dh += dh_out; store dh (the residual's gradient) and dx = dh * keep * scale."""
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


@triton.jit
def _layer_norm_bwd_kernel(
    X, W, DY, DHO,             # saved h (M, N), weight (N,), dy (M, N), dh_out (M, N)
    DX, DH,                    # outputs: d_input (M, N), d_residual = dh (M, N)
    DW, DB,                    # (programs, N) fp32 partial sums of dweight, dbias (zeroed)
    Mean, Rstd,                # saved statistics (M,); Mean unused for RMSNorm
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
        # The partial sums stay in registers across this program's rows.
        dw = tl.zeros([BLOCK_N], dtype=ACC)
        db = tl.zeros([BLOCK_N], dtype=ACC)
        for tile in range(row_start, row_end, BLOCK_M):
            rows = tl.arange(0, BLOCK_M).to(tl.int64) + tile  # int64 whatever the loop var is
            row_ok = rows < row_end
            mask = row_ok[:, None] & (cols < N)[None, :]
            if IS_RMS_NORM:
                mean = tl.zeros([BLOCK_M], dtype=ACC)
            else:
                mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            xhat, dy, g = _tile_g(X, W, DY, rows, cols, mask, N, stride_x, stride_dy, mean, rstd,
                                  HAS_WEIGHT, WEIGHT_PLUS_ONE, ACC)
            c1 = tl.sum(xhat * g, axis=1) / N
            if IS_RMS_NORM:
                c2 = tl.zeros([BLOCK_M], dtype=ACC)
            else:
                c2 = tl.sum(g, axis=1) / N
            dh = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            _tile_store_dx(DX, DH, DHO, rows, cols, mask, N, stride_dx, stride_dh, stride_dho,
                           dh, seed, p, scale, HAS_DH_OUT, HAS_DROPOUT, STORE_DH)
            if HAS_WEIGHT:
                dw += tl.sum(dy * xhat, axis=0)
            if HAS_BIAS:
                db += tl.sum(dy, axis=0)
        if HAS_WEIGHT:
            tl.store(DW + cols, dw, mask=cols < N)
        if HAS_BIAS:
            tl.store(DB + cols, db, mask=cols < N)
    else:
        # Long rows (BLOCK_M == 1), two passes per row: 1) c1, c2; 2) dh, and the partial sums
        # read-modify-written in this program's own row of DW/DB (no other program touches it:
        # no atomics). The compiler may give the load and the store different thread layouts,
        # so a barrier after each row makes one row's stores visible to the next row's loads.
        for tile in range(row_start, row_end, BLOCK_M):
            rows = tl.arange(0, BLOCK_M).to(tl.int64) + tile  # int64 whatever the loop var is
            row_ok = rows < row_end
            if IS_RMS_NORM:
                mean = tl.zeros([BLOCK_M], dtype=ACC)
            else:
                mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            a1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            a2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_ok[:, None] & (c < N)[None, :]
                xhat, dy, g = _tile_g(X, W, DY, rows, c, mask, N, stride_x, stride_dy, mean,
                                      rstd, HAS_WEIGHT, WEIGHT_PLUS_ONE, ACC)
                a1 += xhat * g
                a2 += g
            c1 = tl.sum(a1, axis=1) / N
            if IS_RMS_NORM:
                c2 = tl.zeros([BLOCK_M], dtype=ACC)
            else:
                c2 = tl.sum(a2, axis=1) / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_ok[:, None] & (c < N)[None, :]
                xhat, dy, g = _tile_g(X, W, DY, rows, c, mask, N, stride_x, stride_dy, mean,
                                      rstd, HAS_WEIGHT, WEIGHT_PLUS_ONE, ACC)
                dh = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                _tile_store_dx(DX, DH, DHO, rows, c, mask, N, stride_dx, stride_dh, stride_dho,
                               dh, seed, p, scale, HAS_DH_OUT, HAS_DROPOUT, STORE_DH)
                if HAS_WEIGHT:
                    tl.store(DW + c, tl.load(DW + c, mask=c < N, other=0.0)
                             + tl.sum(dy * xhat, axis=0), mask=c < N)
                if HAS_BIAS:
                    tl.store(DB + c, tl.load(DB + c, mask=c < N, other=0.0)
                             + tl.sum(dy, axis=0), mask=c < N)
            tl.debug_barrier()


def _backward(dy, h, N, weight, bias, mean, rstd, dh_out, p, seed, store_dh, dx_dtype,
              rms=False, cast="torch"):
    block_m, block_n, num_warps, single = calc_settings(N)
    weight = weight.contiguous() if weight is not None else None
    dx = torch.empty(h.shape, dtype=dx_dtype or h.dtype, device=h.device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if store_dh else None
    rows = h.numel() // N if N > 0 else 0
    programs = _num_programs(rows, block_m, h.device) if rows > 0 else 0
    # rows per program: a multiple of BLOCK_M, so that only the last tile of the last program
    # is partial
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), block_m) * block_m if rows else 0
    dw_part = torch.zeros(programs, N, dtype=rstd.dtype, device=h.device) if weight is not None else None
    db_part = torch.zeros(programs, N, dtype=rstd.dtype, device=h.device) if bias is not None else None
    if h.numel() > 0:
        h2, dy2 = as_rows(h, N), as_rows(dy, N)  # (rows, N)
        dho2 = as_rows(dh_out, N) if dh_out is not None else dy2
        dx2 = dx.view(-1, N)
        dh2 = dh.view(-1, N) if dh is not None else dx2
        _layer_norm_bwd_kernel[(programs,)](
            h2, weight if weight is not None else h2, dy2, dho2,
            dx2, dh2,
            dw_part if dw_part is not None else rstd, db_part if db_part is not None else rstd,
            mean if mean is not None else rstd, rstd,
            h2.stride(0), dy2.stride(0), dho2.stride(0), dx2.stride(0), dh2.stride(0),
            rows, N, rows_per_program,
            seed_tensor(seed, h.device) if p > 0.0 else rstd, p, 0.0 if p >= 1.0 else 1.0 / (1.0 - p),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_DH_OUT=dh_out is not None, HAS_DROPOUT=p > 0.0, STORE_DH=store_dh,
            IS_RMS_NORM=rms, WEIGHT_PLUS_ONE=cast == "gemma",
            SINGLE_BLOCK=single, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    # Fixed-order fp32 reduction of the per-program partial sums (deterministic, no atomics).
    dweight = dw_part.sum(0).to(weight.dtype).view(weight.shape) if weight is not None else None
    dbias = db_part.sum(0).to(bias.dtype).view(bias.shape) if bias is not None else None
    return dx, dh, dweight, dbias


def layer_norm_backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    N: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dh_out: Optional[torch.Tensor] = None,
    p: float = 0.0,
    seed=0,
    store_dh: bool = False,
    dx_dtype: Optional[torch.dtype] = None,
):
    """Gradients of layer_norm_forward. dy, h, dh_out (*, N-trailing), all shaped like h; h is what
    the forward normalized (its input x, or the stored h of the fused op); mean, rstd (rows,).

    Returns (dx, dh, dweight, dbias): dh = LN_backward(dy) + dh_out (the gradient of h, i.e. of
    the residual), None unless store_dh; dx = dh * keep / (1 - p) with the forward's mask when
    p > 0, else dh, in dx_dtype (default h's dtype); dweight/dbias in the dtype of weight/bias,
    None when they are None."""
    return _backward(dy, h, N, weight, bias, mean, rstd, dh_out, p, seed, store_dh, dx_dtype)


def rms_norm_backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    N: int,
    weight: Optional[torch.Tensor],
    rstd: torch.Tensor,
    dh_out: Optional[torch.Tensor] = None,
    cast: str = "torch",
    store_dh: bool = False,
    dx_dtype: Optional[torch.dtype] = None,
):
    """Gradients of rms_norm_forward: dy like y, h what it normalized (x, or the returned h),
    dh_out (the gradient of h) like h or None, rstd (rows,). Returns (dx, dh, dweight): dh = the
    norm's gradient + dh_out (None unless store_dh), dx = dh in dx_dtype (default h's dtype),
    dweight in weight's dtype (None without a weight; fp32 fixed-order partial sums)."""
    assert cast in CASTS, cast
    dx, dh, dw, _ = _backward(dy, h, N, weight, None, None, rstd, dh_out, 0.0, 0, store_dh, dx_dtype,
                              rms=True, cast=cast)
    return dx, dh, dw


def compile_variants(quick: bool):
    """One-block and chunked rows, affine on/off, the fused residual+dropout, and RMSNorm (with and
    without the residual, each casting order), per dtype."""
    dtypes = [torch.float16, torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32]

    def r(*shape, dtype):
        return torch.randn(*shape, dtype=dtype)

    for dt in dtypes:
        for n in ([1000, 65536] if quick else [7, 1000, 4096, 8192, 16384, 65536]):
            x, w, b = r(4, n, dtype=dt), r(n, dtype=dt), r(n, dtype=dt)
            for affine in ((w, b), (None, None)):
                y, h, mean, rstd = layer_norm_forward(x, n, *affine, 1e-5)
                layer_norm_backward(r(4, n, dtype=dt), x, n, *affine, mean, rstd)
            y, h, mean, rstd = layer_norm_forward(x, n, w, b, 1e-5, residual=r(4, n, dtype=dt),
                                              p=0.1, seed=1, store_h=True)
            layer_norm_backward(r(4, n, dtype=dt), h, n, w, b, mean, rstd, dh_out=r(4, n, dtype=dt),
                           p=0.1, seed=1, store_dh=True)
            for cast in CASTS:
                for res in (None, r(4, n, dtype=dt)):
                    y, h, rstd = rms_norm_forward(x, n, w, 1e-6, residual=res, cast=cast)
                    rms_norm_backward(r(4, n, dtype=dt), h if h is not None else x, n, w, rstd,
                                      dh_out=r(4, n, dtype=dt) if res is not None else None,
                                      cast=cast, store_dh=res is not None)
