"""Block settings, the launchers (tensors in, tensors out) and compile_variants (see __init__.py)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._common import as_rows, num_sms, register_share, row_config, seed_tensor, stat_dtype, value_words
from .._dtypes import LOW, RMS_NORM_CASTS
from .backward import _layer_norm_bwd_kernel
from .forward import _layer_norm_fwd_kernel


# Largest hidden size (N = prod(normalized_shape)) the launchers accept: the largest size the tests
# run. Nothing in the kernels breaks just above it (large rows loop over chunks), but untested sizes
# raise rather than risk a wrong answer.
MAX_HIDDEN = 65536
# Largest row held in registers at once. A GPU program has at most 16 warps (512 threads) of at
# most 255 32-bit registers each; the backward keeps ~6 fp32 values per column live (x, dy, w,
# dx, and the dweight/dbias partial sums), so 8192 columns is ~16 values per thread per array,
# already near the limit without spilling. Rows longer than this loop over (CHUNK_M, CHUNK_N) tiles
# instead (SINGLE_BLOCK=False): two passes over the program's rows (the input read twice, less
# the forward's held columns, the output written once), but no register spills and no size
# ceiling from the register file. fp64 values take two registers: its single block holds at most
# MAX_BLOCK_N_FP64 columns (at 4096 its forward with a bias spilled 12 B, at 8192 up to 540 B).
MAX_BLOCK_N, MAX_BLOCK_N_FP64 = 8192, 2048


# Long rows (N > MAX_BLOCK_N) are walked in (CHUNK_M, CHUNK_N) tiles: several rows per tile, so
# that the backward's first pass reads a weight chunk once per CHUNK_M rows, and 2048 elements per
# tile (16 warps, 4 per thread per live array; each row's 512 columns are 1 KB contiguous in 16
# bits). Larger tiles spilled in the fused dropout variants on sm_90, at the 128 registers a
# 16-warp program may hold: (4, 2048) forward 104 B and backward 336 B, (4, 1024) backward 16 B.
CHUNK_M, CHUNK_N = 4, 512
# The forward walks long rows in (FWD_CHUNK_M, FWD_CHUNK_N) tiles (2048 elements as the backward's,
# one row: a second-pass tile re-reads its row's mean and rstd once per 2048 columns) and holds the
# first `hold` (_fwd_hold) columns of each row in registers from the statistics sweep to their
# output, so the second pass re-reads only the other N - hold. Per program of R rows, in units of N
# elements (LayerNorm; RMSNorm reads no bias): the input (2 - hold / N) R, the output R, weight and
# bias 2, against the minimum's 2 R (+ 2 once in all): <= 1.5x while R >= 2 N / hold, less the
# statistics' re-reads. On an H100 at 4096 rows (R = 32, 128 programs) with hold = 8192 that is every
# N <= MAX_HIDDEN (counted: LayerNorm 1.47x at 65536; with 4096 it was 1.501x). The (1, 8192) held
# row has the registers per thread of a (4, 2048) tile; at one program per SM the launch passes
# maxnreg = the SM's whole share (register_share): ptxas held three variants at 64 of their 128 and
# spilled 8-12 B on sm_100 without it. With it every 16-bit and fp32 variant compiles without spills
# on sm_90 and sm_100 (<= 128 registers, 16 warps per SM), but fp32 with the fused dropout (held at
# 8192: 64-88 B of spills) and fp64 (at 4096: 60-80 B with a bias or dropout) hold fewer columns.
FWD_CHUNK_M, FWD_CHUNK_N, FWD_HOLD = 1, 2048, 8192


def _fwd_hold(dtype: torch.dtype, p: float) -> int:
    """Columns of each long row the forward holds in registers (HOLD): FWD_HOLD; half for fp32 with
    dropout, a quarter for fp64 (the spills above)."""
    if dtype == torch.float64:
        return FWD_HOLD // 4
    return FWD_HOLD // 2 if dtype == torch.float32 and p > 0.0 else FWD_HOLD


# Programs per SM of the forward (the backward runs one per SM: each writes an fp32 partial row of
# dweight/dbias). Each program loads the weight and bias once and holds them across its rows, so
# fewer programs read them fewer times; two per SM keep 2 x 16 warps of loads in flight.
FWD_PROGRAMS_PER_SM = 2


def calc_settings(N: int, dtype: torch.dtype = torch.float32):
    """(BLOCK_M, BLOCK_N, num_warps, SINGLE_BLOCK) for rows of N elements of `dtype`: one block up to
    MAX_BLOCK_N columns (fp64: MAX_BLOCK_N_FP64; the shared row_config, fp64 tiles at half the
    elements), else (CHUNK_M, CHUNK_N) tiles; raises ValueError past MAX_HIDDEN (ops/layer_norm.py's
    `unsupported` falls back before that).

    Rows under 32 elements run fewer warps per program (row_config's BLOCK_M is at most 128: N = 7
    runs (128, 8) tiles on 4 warps, fp64 on 8) and their fused variants hold 132-147 registers (a
    thread's elements lie in different rows, each with its own offsets into up to six tensors):
    8-12 resident warps per SM, or one 4-warp program in the backward; rows that short move few bytes."""
    words = value_words(dtype)
    block_m, block_n, num_warps, single = row_config(
        N, max_n=MAX_HIDDEN, block_n_cap=MAX_BLOCK_N if words == 1 else MAX_BLOCK_N_FP64, name="layer_norm",
        words=words)
    if single:
        return block_m, block_n, num_warps, single
    return CHUNK_M, CHUNK_N, 16, False


def _rows_per_program(rows: int, block_m: int, programs: int) -> int:
    """Rows per program for about `programs` programs: a multiple of BLOCK_M, so that only the last
    tile of the last program is partial. The grid is then cdiv(rows, this): every program owns
    at least one row. Depends only on (rows, N, device): the backward's fixed-order reduction of
    the per-program partials, and thus dweight/dbias, are bit-identical from run to run."""
    programs = max(1, min(triton.cdiv(rows, block_m), programs))
    return triton.cdiv(triton.cdiv(rows, programs), block_m) * block_m


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float32: tl.float32, torch.float64: tl.float64}
CASTS = RMS_NORM_CASTS  # RMSNorm casting orders (module docstring)


def _forward(x, N, weight, bias, eps, residual, p, seed, store_h, keep, out_dtype, h_dtype,
             rms=False, cast="torch"):
    """Allocate y (out_dtype), h (h_dtype, if store_h) and the statistics, and launch."""
    block_m, block_n, num_warps, single = calc_settings(N, h_dtype)
    if not single:
        block_m, block_n = FWD_CHUNK_M, FWD_CHUNK_N
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
        sms = num_sms(x.device)
        rpp = _rows_per_program(rows, block_m, FWD_PROGRAMS_PER_SM * sms if single else sms)
        _layer_norm_fwd_kernel[(triton.cdiv(rows, rpp),)](
            x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
            y2, h2, keep if keep is not None else y2,
            mean if mean is not None else rstd, rstd,
            x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
            rows, N, rpp, eps,
            seed_tensor(seed, x.device) if p > 0.0 else rstd, p, 0.0 if p >= 1.0 else 1.0 / (1.0 - p),
            HAS_RESIDUAL=residual is not None, HAS_DROPOUT=p > 0.0, STORE_H=store_h,
            STORE_MASK=keep is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, IS_RMS_NORM=rms,
            ROUND_H=rms and residual is not None and low,
            CAST_XHAT=cast == "llama" and low, XHAT_DTYPE=_TL_DTYPE[h_dtype],
            WEIGHT_PLUS_ONE=cast == "gemma",
            SINGLE_BLOCK=single, BLOCK_M=block_m, BLOCK_N=block_n, HOLD=0 if single else _fwd_hold(h_dtype, p),
            num_warps=num_warps, maxnreg=None if single else register_share(num_warps),
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


def _backward(dy, h, N, weight, bias, mean, rstd, dh_out, p, seed, store_dh, dx_dtype,
              rms=False, cast="torch"):
    block_m, block_n, num_warps, single = calc_settings(N, h.dtype)
    weight = weight.contiguous() if weight is not None else None
    dx = torch.empty(h.shape, dtype=dx_dtype or h.dtype, device=h.device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if store_dh else None
    rows = h.numel() // N if N > 0 else 0
    # One program per SM, each owning rows_per_program rows and writing its whole row of the
    # partial buffers (so they need no zeroing).
    rows_per_program = _rows_per_program(rows, block_m, num_sms(h.device)) if rows else 0
    programs = triton.cdiv(rows, rows_per_program) if rows else 0
    dw_part = torch.empty(programs, N, dtype=rstd.dtype, device=h.device) if weight is not None else None
    db_part = torch.empty(programs, N, dtype=rstd.dtype, device=h.device) if bias is not None else None
    # long rows: the row constants c1, c2 between the backward's two passes
    consts = torch.empty(2, rows, dtype=rstd.dtype, device=h.device) if not single and rows else rstd
    if h.numel() > 0:
        h2, dy2 = as_rows(h, N), as_rows(dy, N)  # (rows, N)
        dho2 = as_rows(dh_out, N) if dh_out is not None else dy2
        dx2 = dx.view(-1, N)
        dh2 = dh.view(-1, N) if dh is not None else dx2
        _layer_norm_bwd_kernel[(programs,)](
            h2, weight if weight is not None else h2, dy2, dho2,
            dx2, dh2,
            dw_part if dw_part is not None else rstd, db_part if db_part is not None else rstd,
            mean if mean is not None else rstd, rstd, consts,
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
    dtypes = [torch.float16, torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32, torch.float64]

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
