"""LayerNorm, and the fused `h = residual + dropout(x); y = LayerNorm(h)` sub-layer, in Triton.

The input is viewed as (rows, N), N = prod(normalized_shape); every row is normalized on its own.
One forward kernel and one backward kernel serve both ops: the residual add, the dropout, the store
of h and the affine weight/bias are `tl.constexpr` flags, so a plain LayerNorm compiles none of the
residual/dropout code.

Launchers (tensors in, tensors out):
    layer_norm_fwd(x, N, weight, bias, eps, residual=None, p=0.0, seed=0, store_h=False,
                   return_mask=False) -> (y, h, mean, rstd[, keep_mask])
    layer_norm_bwd(dy, h, N, weight, bias, mean, rstd, dh_out=None, p=0.0, seed=0,
                   store_dh=False, dx_dtype=None) -> (dx, dh, dweight, dbias)
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

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
# Elements per program tile. Short rows are processed BLOCK_M at a time as a (BLOCK_M, BLOCK_N)
# tile, so that a program is not a single warp idling on 64 columns. Under the interpreter every
# program is a Python call, so large tiles (numpy-vectorized) are far faster there.
TILE_ELEMENTS = 4096
TILE_ELEMENTS_INTERPRETER = 65536
MAX_BLOCK_M = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def calc_settings(N: int):
    """(BLOCK_M, BLOCK_N, num_warps, SINGLE_BLOCK) for rows of N elements; raises past MAX_HIDDEN.

    BLOCK_N = next_power_of_2(N) up to MAX_BLOCK_N (SINGLE_BLOCK: the row is one block), else
    MAX_BLOCK_N-column chunks; BLOCK_M rows per tile (1 for chunked rows)."""
    if N > MAX_HIDDEN:
        raise ValueError(
            f"fasttx layer_norm supports at most {MAX_HIDDEN} normalized elements per row "
            f"(prod(normalized_shape)), got {N}"
        )
    block_n = triton.next_power_of_2(max(N, 1))
    single = block_n <= MAX_BLOCK_N
    block_n = min(block_n, MAX_BLOCK_N)
    tile = TILE_ELEMENTS_INTERPRETER if _interpreting() else TILE_ELEMENTS
    block_m = min(max(tile // block_n, 1), MAX_BLOCK_M) if single else 1
    # ~8 elements per thread per live array at the largest tile; at least one warp.
    num_warps = min(max(block_m * block_n // 256, 1), 16)
    return block_m, block_n, num_warps, single


def _rows_view(t: torch.Tensor, N: int) -> torch.Tensor:
    """t (*, N-trailing) as a (rows, N) view with unit column stride; a copy only when needed."""
    t2 = t.reshape(-1, N)  # (rows, N): a view whenever the leading dims merge into one stride
    if N > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _num_programs(rows: int, block_m: int, device: torch.device) -> int:
    """Programs of the backward kernel, each owning a contiguous group of rows. One per SM keeps
    the (programs, N) fp32 partial-sum buffer small; it depends only on (rows, N, device), so the
    fixed-order reduction, and thus dweight/dbias, are bit-identical from run to run."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4  # the interpreter runs programs one after another: few, long programs are fastest
    return max(1, min(triton.cdiv(rows, block_m), sms))


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_h(
    X, R, KEEP,                # input, residual, keep-mask output (test hook)
    rows, cols, M, N,          # (BLOCK_M,) int64 row and (BLOCK_N,) column indices; sizes
    stride_x, stride_r,        # row strides
    seed, p, scale,            # dropout: Philox seed, drop probability, 1/(1-p) (0 when p == 1)
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_MASK: tl.constexpr,
    ACC: tl.constexpr,         # accumulator dtype (fp32, or fp64 for fp64 inputs)
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
    return h


@triton.jit
def _layer_norm_fwd(
    X, R, W, B,                # input (M, N), residual (M, N), weight (N,), bias (N,)
    Y, H, KEEP,                # outputs: y (M, N), h (M, N), keep mask int8 (M, N)
    Mean, Rstd,                # saved statistics (M,), fp32 (fp64 for fp64 inputs)
    stride_x, stride_r,        # row strides (elements) of X and R; columns are contiguous
    stride_y, stride_h,        # row strides of Y and H
    M, N,                      # rows, row length
    eps,                       # added to the variance
    seed, p, scale,            # dropout
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_H: tl.constexpr,
    STORE_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # the whole row fits in one BLOCK_N (else loop over chunks)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per BLOCK_M rows. Statistics in ACC (fp32 at least); the variance is taken
    # from centred values, mean((h - mean)^2), never E[h^2] - E[h]^2, so a large common offset
    # (h ~ 1000 + noise) loses no accuracy.
    ACC: tl.constexpr = Mean.dtype.element_ty
    # int64 rows: row * stride can exceed 2^31
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        mask = row_ok[:, None] & (cols < N)[None, :]
        h = _load_h(X, R, KEEP, rows, cols, M, N, stride_x, stride_r, seed, p, scale,
                    HAS_RESIDUAL, HAS_DROPOUT, STORE_MASK, ACC)  # (BLOCK_M, BLOCK_N)
        if STORE_H:
            tl.store(H + rows[:, None] * stride_h + cols[None, :], h.to(H.dtype.element_ty),
                     mask=mask)
        mean = tl.sum(h, axis=1) / N  # (BLOCK_M,)
        # One correction step: the sum above rounds at the scale of |h| (e.g. 1000), the centred
        # sum at the scale of the spread, so mean + mean(h - mean) is accurate to the spread's
        # precision; y = (h - mean) * rstd would carry the first mean's error times rstd.
        mean += tl.sum(tl.where(mask, h - mean[:, None], 0.0), axis=1) / N
        hc = tl.where(mask, h - mean[:, None], 0.0)
        var = tl.sum(hc * hc, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        y = hc * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(ACC)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(ACC)[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Long rows (BLOCK_M == 1): three passes over the row, recomputing h (and regenerating
        # the same dropout mask) each time instead of keeping it: 1) mean (and the h / mask
        # stores), 2) variance from centred values, 3) normalize and store.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            h = _load_h(X, R, KEEP, rows, c, M, N, stride_x, stride_r, seed, p, scale,
                        HAS_RESIDUAL, HAS_DROPOUT, STORE_MASK, ACC)
            if STORE_H:
                tl.store(H + rows[:, None] * stride_h + c[None, :], h.to(H.dtype.element_ty),
                         mask=row_ok[:, None] & (c < N)[None, :])
            acc += h
        mean = tl.sum(acc, axis=1) / N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            h = _load_h(X, R, KEEP, rows, c, M, N, stride_x, stride_r, seed, p, scale,
                        HAS_RESIDUAL, HAS_DROPOUT, False, ACC)
            hc = tl.where(row_ok[:, None] & (c < N)[None, :], h - mean[:, None], 0.0)
            acc += hc
            acc2 += hc * hc
        # The corrected two-pass formula: with d = mean(h - m) for the first estimate m,
        # mean = m + d and var = mean((h - m)^2) - d^2 (the single-block path's correction step).
        d = tl.sum(acc, axis=1) / N
        mean += d
        var = tl.sum(acc2, axis=1) / N - d * d
        rstd = 1.0 / tl.sqrt(var + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            m = row_ok[:, None] & (c < N)[None, :]
            h = _load_h(X, R, KEEP, rows, c, M, N, stride_x, stride_r, seed, p, scale,
                        HAS_RESIDUAL, HAS_DROPOUT, False, ACC)
            y = (h - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                y = y * tl.load(W + c, mask=c < N, other=0.0).to(ACC)[None, :]
            if HAS_BIAS:
                y = y + tl.load(B + c, mask=c < N, other=0.0).to(ACC)[None, :]
            tl.store(Y + rows[:, None] * stride_y + c[None, :], y.to(Y.dtype.element_ty), mask=m)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


def layer_norm_fwd(
    x: torch.Tensor,
    N: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    residual: Optional[torch.Tensor] = None,
    p: float = 0.0,
    seed: int = 0,
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
    block_m, block_n, num_warps, single = calc_settings(N)
    weight = weight.contiguous() if weight is not None else None  # kernels index W + col
    bias = bias.contiguous() if bias is not None else None
    out_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    stat_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    rows = x.numel() // N if N > 0 else 0
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    h = torch.empty(x.shape, dtype=out_dtype, device=x.device) if store_h else None
    mean = torch.empty(rows, dtype=stat_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=stat_dtype, device=x.device)
    has_dropout = p > 0.0
    keep = torch.empty(x.shape, dtype=torch.int8, device=x.device) if return_mask and has_dropout else None
    if x.numel() > 0:
        x2 = _rows_view(x, N)  # (rows, N)
        r2 = _rows_view(residual, N) if residual is not None else x2
        y2 = y.view(-1, N)
        h2 = h.view(-1, N) if store_h else y2
        _layer_norm_fwd[(triton.cdiv(rows, block_m),)](
            x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
            y2, h2, keep if keep is not None else y2,
            mean, rstd,
            x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
            rows, N, eps,
            seed, p, 0.0 if p >= 1.0 else 1.0 / (1.0 - p),
            HAS_RESIDUAL=residual is not None, HAS_DROPOUT=has_dropout, STORE_H=store_h,
            STORE_MASK=keep is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, SINGLE_BLOCK=single, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps,
        )
    out = (y, h, mean, rstd)
    if return_mask:
        out = out + (keep.bool() if keep is not None else None,)
    return out


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
# With xhat = (h - mean) * rstd, y = xhat * w + b, g = dy * w (g = dy without a weight), and
# means over the row's N columns:
#     dxhat/dh_j = rstd (delta_ij - 1/N - xhat_i xhat_j / N)
#     dh = rstd * (g - mean(g) - xhat * mean(xhat * g))
#     dweight = sum_rows dy * xhat,     dbias = sum_rows dy
# The fused op adds the gradient flowing into its second output h:  dh += dh_out.
# Then d_residual = dh and d_input = dh * keep / (1 - p) (the same mask, regenerated from the seed).
# dweight/dbias: each program sums its contiguous group of rows in fp32 into its own row of a
# (programs, N) buffer; the launcher reduces that buffer in a fixed order. No atomics: two
# backward runs give bit-identical results.
@triton.jit
def _tile_g(
    X, W, DY, rows, cols, mask, N, stride_x, stride_dy, mean, rstd,
    HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
):
    """(xhat, dy, g = dy * w) of a (BLOCK_M, BLOCK_N) tile, in ACC, 0 outside the tensor."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(W + cols, mask=cols < N, other=0.0).to(ACC)[None, :]
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
def _layer_norm_bwd(
    X, W, DY, DHO,             # saved h (M, N), weight (N,), dy (M, N), dh_out (M, N)
    DX, DH,                    # outputs: d_input (M, N), d_residual = dh (M, N)
    DW, DB,                    # (programs, N) fp32 partial sums of dweight, dbias (zeroed)
    Mean, Rstd,                # saved statistics (M,)
    stride_x, stride_dy, stride_dho, stride_dx, stride_dh,  # row strides, unit column stride
    M, N, rows_per_program,
    seed, p, scale,            # dropout, as in the forward
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH_OUT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, STORE_DH: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Each program owns rows [row_start, row_end) and walks them BLOCK_M at a time.
    ACC: tl.constexpr = Mean.dtype.element_ty
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
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            xhat, dy, g = _tile_g(X, W, DY, rows, cols, mask, N, stride_x, stride_dy, mean, rstd,
                                  HAS_WEIGHT, ACC)
            c1 = tl.sum(xhat * g, axis=1) / N
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
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            a1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            a2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_ok[:, None] & (c < N)[None, :]
                xhat, dy, g = _tile_g(X, W, DY, rows, c, mask, N, stride_x, stride_dy, mean,
                                      rstd, HAS_WEIGHT, ACC)
                a1 += xhat * g
                a2 += g
            c1 = tl.sum(a1, axis=1) / N
            c2 = tl.sum(a2, axis=1) / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_ok[:, None] & (c < N)[None, :]
                xhat, dy, g = _tile_g(X, W, DY, rows, c, mask, N, stride_x, stride_dy, mean,
                                      rstd, HAS_WEIGHT, ACC)
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


def layer_norm_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    N: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dh_out: Optional[torch.Tensor] = None,
    p: float = 0.0,
    seed: int = 0,
    store_dh: bool = False,
    dx_dtype: Optional[torch.dtype] = None,
):
    """Gradients of layer_norm_fwd. dy, h, dh_out (*, N-trailing), all shaped like h; h is what
    the forward normalized (its input x, or the stored h of the fused op); mean, rstd (rows,).

    Returns (dx, dh, dweight, dbias): dh = LN_backward(dy) + dh_out (the gradient of h, i.e. of
    the residual), None unless store_dh; dx = dh * keep / (1 - p) with the forward's mask when
    p > 0, else dh, in dx_dtype (default h's dtype); dweight/dbias in the dtype of weight/bias,
    None when they are None."""
    block_m, block_n, num_warps, single = calc_settings(N)
    weight = weight.contiguous() if weight is not None else None
    dx = torch.empty(h.shape, dtype=dx_dtype or h.dtype, device=h.device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if store_dh else None
    rows = h.numel() // N if N > 0 else 0
    programs = _num_programs(rows, block_m, h.device) if rows > 0 else 0
    # rows per program: a multiple of BLOCK_M, so that only the last tile of the last program
    # is partial
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), block_m) * block_m if rows else 0
    dw_part = torch.zeros(programs, N, dtype=mean.dtype, device=h.device) if weight is not None else None
    db_part = torch.zeros(programs, N, dtype=mean.dtype, device=h.device) if bias is not None else None
    if h.numel() > 0:
        h2, dy2 = _rows_view(h, N), _rows_view(dy, N)  # (rows, N)
        dho2 = _rows_view(dh_out, N) if dh_out is not None else dy2
        dx2 = dx.view(-1, N)
        dh2 = dh.view(-1, N) if dh is not None else dx2
        _layer_norm_bwd[(programs,)](
            h2, weight if weight is not None else h2, dy2, dho2,
            dx2, dh2,
            dw_part if dw_part is not None else mean, db_part if db_part is not None else mean,
            mean, rstd,
            h2.stride(0), dy2.stride(0), dho2.stride(0), dx2.stride(0), dh2.stride(0),
            rows, N, rows_per_program,
            seed, p, 0.0 if p >= 1.0 else 1.0 / (1.0 - p),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_DH_OUT=dh_out is not None, HAS_DROPOUT=p > 0.0, STORE_DH=store_dh,
            SINGLE_BLOCK=single, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    # Fixed-order fp32 reduction of the per-program partial sums (deterministic, no atomics).
    dweight = dw_part.sum(0).to(weight.dtype).view(weight.shape) if weight is not None else None
    dbias = db_part.sum(0).to(bias.dtype).view(bias.shape) if bias is not None else None
    return dx, dh, dweight, dbias


def compile_variants(quick: bool):
    """One-block and chunked rows, affine on/off, and the fused residual+dropout, per dtype."""
    dtypes = [torch.float16, torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32]

    def r(*shape, dtype):
        return torch.randn(*shape, dtype=dtype)

    for dt in dtypes:
        for n in ([1000, 65536] if quick else [7, 1000, 4096, 8192, 16384, 65536]):
            x, w, b = r(4, n, dtype=dt), r(n, dtype=dt), r(n, dtype=dt)
            for affine in ((w, b), (None, None)):
                y, h, mean, rstd = layer_norm_fwd(x, n, *affine, 1e-5)
                layer_norm_bwd(r(4, n, dtype=dt), x, n, *affine, mean, rstd)
            y, h, mean, rstd = layer_norm_fwd(x, n, w, b, 1e-5, residual=r(4, n, dtype=dt),
                                              p=0.1, seed=1, store_h=True)
            layer_norm_bwd(r(4, n, dtype=dt), h, n, w, b, mean, rstd, dh_out=r(4, n, dtype=dt),
                           p=0.1, seed=1, store_dh=True)
