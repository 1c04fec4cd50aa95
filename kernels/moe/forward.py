"""Forward kernels: the gate/up grouped GEMM with the activation, the down grouped GEMM, the
fixed-order combine (see __init__.py)."""
import triton
import triton.language as tl

from .activation import _glu
from .routing import _tile


@triton.jit
def _up_kernel(
    X,  # (T, H) tokens, unit column stride
    W1,  # gate_up weights: element (e, n, h) at e*stride_we + n*stride_wn + h*stride_wk
    B1,  # (E, 2I) gate_up bias (unused unless HAS_BIAS)
    A,  # (N, NI) out: act(gate, up) per sorted pair
    SORTED_TOK,  # (N,) token of each sorted pair
    TILE_EXPERT, TILE_ROW0, OFFSETS,  # the tile map (see routing)
    E, NI, H,
    stride_xt, stride_we, stride_wn, stride_wk, stride_be, stride_a,
    UP_OFF,  # W1 row of up column j: j * N_STEP + UP_OFF (gate: j * N_STEP)
    ALPHA, LIMIT,  # clamped swiglu constants
    N_STEP: tl.constexpr,  # 1 concatenated, 2 interleaved
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, rows, rmask = _tile(TILE_EXPERT, TILE_ROW0, OFFSETS, E, tl.program_id(0), BLOCK_M)
    if e < E:
        tok = tl.load(SORTED_TOK + rows, mask=rmask, other=0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < NI
        g_rows = cols.to(tl.int64) * N_STEP
        u_rows = g_rows + UP_OFF
        wbase = W1 + e.to(tl.int64) * stride_we
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < H
            x = tl.load(X + tok[:, None] * stride_xt + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            wmask = kmask[:, None] & cmask[None, :]
            wg = tl.load(wbase + g_rows[None, :] * stride_wn + ks[:, None] * stride_wk, mask=wmask, other=0.0)
            wu = tl.load(wbase + u_rows[None, :] * stride_wn + ks[:, None] * stride_wk, mask=wmask, other=0.0)
            if UPCAST:
                x, wg, wu = x.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
            acc_g = tl.dot(x, wg, acc_g, input_precision=DOT_PREC)
            acc_u = tl.dot(x, wu, acc_u, input_precision=DOT_PREC)
        if HAS_BIAS:
            bbase = B1 + e.to(tl.int64) * stride_be
            acc_g += tl.load(bbase + g_rows, mask=cmask, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(bbase + u_rows, mask=cmask, other=0.0).to(tl.float32)[None, :]
        h = _glu(acc_g, acc_u, ACT, ALPHA, LIMIT)
        tl.store(A + rows.to(tl.int64)[:, None] * stride_a + cols[None, :], h.to(A.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _down_kernel(
    A,  # (N, K) sorted-pair rows, unit column stride
    W,  # element (e, n, k) at e*stride_we + n*stride_wn + k*stride_wk
    B,  # (E, NOUT) bias (unused unless HAS_BIAS)
    S,  # (T*k,) per-pair scale read at SORTED_PAIR[r] (unused unless HAS_SCALE)
    Y,  # (N, NOUT) out, sorted-pair rows
    SORTED_PAIR,
    TILE_EXPERT, TILE_ROW0, OFFSETS,
    E, NOUT, K,
    stride_a, stride_we, stride_wn, stride_wk, stride_be, stride_y,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, rows, rmask = _tile(TILE_EXPERT, TILE_ROW0, OFFSETS, E, tl.program_id(0), BLOCK_M)
    if e < E:
        rows64 = rows.to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < NOUT
        wbase = W + e.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            a = tl.load(A + rows64[:, None] * stride_a + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(wbase + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
        if HAS_BIAS:
            acc += tl.load(B + e.to(tl.int64) * stride_be + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            pair = tl.load(SORTED_PAIR + rows, mask=rmask, other=0)
            acc = acc * tl.load(S + pair, mask=rmask, other=0.0).to(tl.float32)[:, None]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], acc.to(Y.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _combine_kernel(
    Y,  # (N, C) sorted-pair rows
    INV,  # (T*k,) sorted row of pair t*k + j
    N_VALID,  # (1,) rows [0, N_VALID) hold pairs of the experts present; the rest read as 0
    OUT,  # (T, C)
    T, C, stride_y, stride_o,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tmask = toks < T
    mask = tmask[:, None] & (cols < C)[None, :]
    n_valid = tl.load(N_VALID)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in range(TOP_K):  # fixed order j = 0..k-1
        r = tl.load(INV + toks.to(tl.int64) * TOP_K + j, mask=tmask, other=0).to(tl.int64)
        m = mask & (r < n_valid)[:, None]  # a pair of an absent expert (expert parallel) adds 0
        acc += tl.load(Y + r[:, None] * stride_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + toks.to(tl.int64)[:, None] * stride_o + cols[None, :], acc.to(OUT.dtype.element_ty), mask=mask)
