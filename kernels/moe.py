"""Mixture-of-experts MLP: routing metadata, grouped expert GEMMs with the gated activation fused,
a fixed-order combine back to tokens, and the backward, all without a host synchronisation.

For T tokens x (T, H), each routed to k experts (top_k_index (T, k), top_k_weights w (T, k)), with
gate_up W1 (E, 2I, H) ([gate; up] rows, or interleaved gate0, up0, gate1, ...) and down W2 (E, H, I)
(`transposed`: W1 (E, H, 2I), W2 (E, I, H), gpt-oss's layout), optional biases b1 (E, 2I), b2 (E, H):

    for pair p = (t, j), e = top_k_index[t, j]:
        g_p = x_t W1g[e]^T + b1g[e],  u_p = x_t W1u[e]^T + b1u[e]          (I each)
        a_p = act(g_p, u_p)          silu(g) u | gelu(g) u | gelu_tanh(g) u |
                                     clamped swiglu: (clamp(u, -L, L) + 1) gc sigmoid(alpha gc), gc = min(g, L)
        y_p = a_p W2[e]^T + b2[e]                                           (H)
    out_t = sum_j w[t, j] y_(t, j)                                          (j = 0..k-1, in that order)

Routing metadata (`routing`, torch ops on the device, no .item()/.tolist(), static shapes): the
N = T*k (token, slot) pairs are stably sorted by expert (torch.sort(stable=True): ties keep pair
order, so the layout is a function of top_k_index alone); per-expert row offsets come from
searchsorted on the sorted ids; each expert's rows are cut into BLOCK_M-row tiles and a tile ->
(expert, first row) map of static length cdiv(N, BLOCK_M) + min(E, N) (an upper bound on
sum_e cdiv(count_e, BLOCK_M)) is built with cumsum/searchsorted. The GEMM grids run over those
tiles: an expert with no token owns no tile and costs no GEMM work; unused tiles (expert id E)
return at once.

Kernels (each a grouped GEMM over row tiles of the sorted pairs, the expert read per tile):
    _up_kernel       h[r] = act(x[tok r] W1g[e]^T + b1g, x[tok r] W1u[e]^T + b1u)   gather in the prologue,
                     activation in the epilogue (gate and up accumulate side by side)
    _down_kernel     y[r] = s_r (a[r] W[e]^T + b[e]) -- forward down (s = w of pair r, in its epilogue) and
                     the backward's d(x) pairs (a = d(gate|up), W = W1 read transposed, s = 1)
    _combine_kernel  out[t] = sum_j y[inv[t k + j]]  fp32, j in order: no atomics
    _up_bwd_kernel   one pass over H per tile: G = dout[tok] W2[e] (the unweighted d a), and the
                     recomputed g, u (same K loop); writes a[r] (for dW2), d(gate|up)[r] in W1's row
                     order, and per column-block partials of d w_p = G . a_p + dout_t . b2[e]
    _wgrad_kernel    dW[e] = sum over the expert's rows r of A[r]^T B[r] (+ db[e] = sum_r A[r]): for
                     dW2 (A = w_r dout[tok r], B = a) and dW1 (A = d(gate|up), B = x[tok r]); the
                     rows are walked in order by one program per output tile: no atomics

Backward math (da = w_p G, G = dout_t W2[e]):
    d w_p    = dout_t . y_p = G . a_p + dout_t . b2[e]
    dW2[e]   = sum_p (w_p dout_t)^T a_p,   db2[e] = sum_p w_p dout_t
    dg, du   = da * d act / d(g, u)        (silu: u s (1 + g (1 - s)), s(g) | gelu: u gelu'(g) |
               clamped: dg = da (uc + 1) (s + alpha gc s (1 - s)) [g <= L], du = da gc s [-L <= u <= L])
    dW1[e]   = sum_p d(gate|up)_p^T x_t,   db1[e] = sum_p d(gate|up)_p
    dx_t     = sum_j d(gate|up)_(t,j) W1[e]    (per pair, then the same fixed-order combine)
Every sum runs in fp32 registers in a fixed order (tile by tile, rows in sorted order), so two
backward runs are bit-identical. d w sums its column-block partials with torch's sum (no atomics).

Memory: the forward keeps nothing of (N, 2I) or (N, I): the backward recomputes g and u from x in
the same K loop that computes G = dout W2 (both read H), so the recompute costs one gate/up GEMM
(4 N H I FLOPs, a third on top of the backward's 12 N H I) but keeps N * 2I elements from living
between forward and backward. Storing them is not faster at equal memory: at equal memory there is
nothing to store, and storing them (the alternative) trades N * 2I elements of activation memory per
layer for that third. The routing metadata is also
recomputed (a sort of N ints) instead of saved.

Expert parallel (expert_ids given): the weights hold E_local experts, expert_ids[i] the global id
of slot i, top_k_index global ids. Routing maps each pair's id to its slot on the device (sort +
searchsorted over the E_local ids, `local_slots`); pairs of absent experts get slot E_local, sort
after every present pair and own no tile (no GEMM work, rows never written); the combine reads
rows from offsets[E_local] on as zero. The output, d(x) and d(w) are then this shard's share of
a sum over shards; the weight and bias gradients are the local experts' own.

Launchers:
    routing(top_k_index, num_experts, block_m, expert_ids=None) -> Routing
    moe_forward(x, top_k_index, top_k_weights, w1, w2, b1, b2, cfg, expert_ids=None) -> out (T, H)
    moe_backward(dout, x, top_k_index, top_k_weights, w1, w2, b1, b2, cfg, expert_ids=None)
        -> (dx, dw, dw1, dw2, db1, db2)
cfg = (activation, alpha, limit, interleaved, transposed).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING
from ._math import gelu, gelu_grad

_SILU = tl.constexpr(0)
_GELU = tl.constexpr(1)
_GELU_TANH = tl.constexpr(2)
_CLAMPED = tl.constexpr(3)
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "clamped_swiglu": 3}

# Tiles. On a GPU tl.dot needs every dim >= 16; one config (no autotune yet: bench first).
if INTERPRETING:
    BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32
else:
    BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64
_NUM_WARPS, _NUM_STAGES = 4, 3


def _dot_flags(dtype: torch.dtype):
    """(UPCAST, DOT_PREC): under the interpreter 16-bit tl.dot operands are upcast to fp32 (it gives
    garbage otherwise); fp32 inputs use full-precision ("ieee") dots, as torch's matmul does."""
    return INTERPRETING and dtype != torch.float32, "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _glu(g, u, ACT: tl.constexpr, ALPHA, LIMIT):
    if ACT == _SILU:
        return g / (1.0 + tl.exp(-g)) * u
    elif ACT == _GELU:
        return gelu(g, False) * u
    elif ACT == _GELU_TANH:
        return gelu(g, True) * u
    else:
        gc = tl.minimum(g, LIMIT)
        uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        return (uc + 1.0) * gc * _sigmoid(ALPHA * gc)


@triton.jit
def _glu_grad(da, g, u, ACT: tl.constexpr, ALPHA, LIMIT):
    """(dg, du) of a = act(g, u) for upstream da (see the module docstring)."""
    if ACT == _SILU:
        s = _sigmoid(g)
        return da * u * s * (1.0 + g * (1.0 - s)), da * g * s
    elif ACT == _GELU:
        return da * u * gelu_grad(g, False), da * gelu(g, False)
    elif ACT == _GELU_TANH:
        return da * u * gelu_grad(g, True), da * gelu(g, True)
    else:
        gc = tl.minimum(g, LIMIT)
        uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        s = _sigmoid(ALPHA * gc)
        dg = da * (uc + 1.0) * (s + ALPHA * gc * s * (1.0 - s))
        du = da * gc * s
        # torch's clamp passes the gradient where min <= x <= max (ends included)
        return tl.where(g <= LIMIT, dg, 0.0), tl.where((u >= -LIMIT) & (u <= LIMIT), du, 0.0)


@triton.jit
def _tile(TILE_EXPERT, TILE_ROW0, OFFSETS, E, pid, BLOCK_M: tl.constexpr):
    """(expert, rows, row mask) of row tile `pid`; expert >= E marks an unused tile."""
    e = tl.load(TILE_EXPERT + pid)
    row0 = tl.load(TILE_ROW0 + pid)
    row_end = tl.load(OFFSETS + tl.minimum(e, E - 1) + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    return e, rows, rows < row_end


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


@triton.jit
def _up_bwd_kernel(
    DOUT,  # (T, H) upstream gradient, unit column stride
    X,  # (T, H)
    W1,  # gate_up weights, as in _up_kernel
    B1,  # (E, 2I) (unused unless HAS_B1)
    W2,  # down weights: element (e, h, i) at e*stride_2e + h*stride_2h + i*stride_2i
    B2,  # (E, H) (unused unless HAS_B2)
    RW,  # (T*k,) routing weights
    A,  # (N, NI) out: recomputed act(g, u)
    DGU,  # (N, 2I) out: d(gate|up) in W1's row order
    DW_PART,  # (cdiv(NI, BLOCK_N), N) fp32 out: partials of d w per column block
    SORTED_TOK, SORTED_PAIR,
    TILE_EXPERT, TILE_ROW0, OFFSETS,
    E, NI, H, N,
    stride_dt, stride_xt, stride_we, stride_wn, stride_wk, stride_be,
    stride_2e, stride_2h, stride_2i, stride_b2e, stride_a, stride_dgu,
    UP_OFF, ALPHA, LIMIT,
    N_STEP: tl.constexpr, ACT: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, rows, rmask = _tile(TILE_EXPERT, TILE_ROW0, OFFSETS, E, tl.program_id(0), BLOCK_M)
    if e < E:
        pid_n = tl.program_id(1)
        rows64 = rows.to(tl.int64)
        tok = tl.load(SORTED_TOK + rows, mask=rmask, other=0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < NI
        g_rows = cols.to(tl.int64) * N_STEP
        u_rows = g_rows + UP_OFF
        e64 = e.to(tl.int64)
        w1 = W1 + e64 * stride_we
        w2 = W2 + e64 * stride_2e
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_G = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        dob = tl.zeros((BLOCK_M,), dtype=tl.float32)  # dout_t . b2[e]
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < H
            m2 = rmask[:, None] & kmask[None, :]
            x = tl.load(X + tok[:, None] * stride_xt + ks[None, :], mask=m2, other=0.0)
            do = tl.load(DOUT + tok[:, None] * stride_dt + ks[None, :], mask=m2, other=0.0)
            wmask = kmask[:, None] & cmask[None, :]
            wg = tl.load(w1 + g_rows[None, :] * stride_wn + ks[:, None] * stride_wk, mask=wmask, other=0.0)
            wu = tl.load(w1 + u_rows[None, :] * stride_wn + ks[:, None] * stride_wk, mask=wmask, other=0.0)
            wd = tl.load(w2 + ks[:, None] * stride_2h + cols[None, :] * stride_2i, mask=wmask, other=0.0)
            if HAS_B2:
                b2 = tl.load(B2 + e64 * stride_b2e + ks, mask=kmask, other=0.0).to(tl.float32)
                dob += tl.sum(do.to(tl.float32) * b2[None, :], 1)
            if UPCAST:
                x, do = x.to(tl.float32), do.to(tl.float32)
                wg, wu, wd = wg.to(tl.float32), wu.to(tl.float32), wd.to(tl.float32)
            acc_g = tl.dot(x, wg, acc_g, input_precision=DOT_PREC)
            acc_u = tl.dot(x, wu, acc_u, input_precision=DOT_PREC)
            acc_G = tl.dot(do, wd, acc_G, input_precision=DOT_PREC)
        if HAS_B1:
            b1 = B1 + e64 * stride_be
            acc_g += tl.load(b1 + g_rows, mask=cmask, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(b1 + u_rows, mask=cmask, other=0.0).to(tl.float32)[None, :]
        a = _glu(acc_g, acc_u, ACT, ALPHA, LIMIT)
        m = rmask[:, None] & cmask[None, :]
        a_st = a.to(A.dtype.element_ty)
        tl.store(A + rows64[:, None] * stride_a + cols[None, :], a_st, mask=m)
        # d w_p partial over this column block; the b2 term once (column block 0)
        dwp = tl.sum(tl.where(m, acc_G * a, 0.0), 1)
        if pid_n == 0:
            dwp += dob
        tl.store(DW_PART + pid_n.to(tl.int64) * N + rows64, dwp, mask=rmask)
        pair = tl.load(SORTED_PAIR + rows, mask=rmask, other=0)
        w = tl.load(RW + pair, mask=rmask, other=0.0).to(tl.float32)
        dg, du = _glu_grad(acc_G * w[:, None], acc_g, acc_u, ACT, ALPHA, LIMIT)
        base = DGU + rows64[:, None] * stride_dgu
        tl.store(base + g_rows[None, :], dg.to(DGU.dtype.element_ty), mask=m)
        tl.store(base + u_rows[None, :], du.to(DGU.dtype.element_ty), mask=m)


@triton.jit
def _wgrad_kernel(
    AOP,  # rows r: A[r, n] at AOP + arow(r)*stride_a + n (arow = SORTED_TOK[r] if GATHER_A else r)
    BOP,  # rows r: B[r, c] at BOP + brow(r)*stride_b + c (brow = SORTED_TOK[r] if GATHER_B else r)
    SCALE,  # (T*k,) per-pair scale of A, read at SORTED_PAIR[r] (unused unless HAS_SCALE)
    DW,  # out: dW[e, n, c] at e*stride_de + n*stride_dn + c*stride_dc
    DB,  # out: (E, NW) bias grad sum_r A[r, n] (unused unless HAS_BIAS)
    SORTED_TOK, SORTED_PAIR, OFFSETS,
    NW, CW,
    stride_a, stride_b, stride_de, stride_dn, stride_dc, stride_dbe,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_c = tl.program_id(2)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cs = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = ns < NW
    cmask = cs < CW
    start = tl.load(OFFSETS + e)
    end = tl.load(OFFSETS + e + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    accb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):  # the expert's rows, in sorted order: no work if empty
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        if GATHER_A or GATHER_B:
            tok = tl.load(SORTED_TOK + rows, mask=rmask, other=0).to(tl.int64)
        arow = tok if GATHER_A else rows.to(tl.int64)
        brow = tok if GATHER_B else rows.to(tl.int64)
        at = tl.load(AOP + arow[None, :] * stride_a + ns[:, None], mask=nmask[:, None] & rmask[None, :], other=0.0)
        b = tl.load(BOP + brow[:, None] * stride_b + cs[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        if HAS_SCALE:
            pair = tl.load(SORTED_PAIR + rows, mask=rmask, other=0)
            s = tl.load(SCALE + pair, mask=rmask, other=0.0).to(tl.float32)
            at = (at.to(tl.float32) * s[None, :]).to(AOP.dtype.element_ty)
        if HAS_BIAS:
            accb += tl.sum(at.to(tl.float32), 1)
        if UPCAST:
            at, b = at.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(at, b, acc, input_precision=DOT_PREC)
    e64 = e.to(tl.int64)
    tl.store(DW + e64 * stride_de + ns[:, None].to(tl.int64) * stride_dn + cs[None, :] * stride_dc,
             acc.to(DW.dtype.element_ty), mask=nmask[:, None] & cmask[None, :])
    if HAS_BIAS:
        if pid_c == 0:
            tl.store(DB + e64 * stride_dbe + ns, accb.to(DB.dtype.element_ty), mask=nmask)


class Routing(NamedTuple):
    sorted_pair: torch.Tensor  # (N,) int32: pair index (t*k + j) of each sorted row
    sorted_tok: torch.Tensor  # (N,) int32: its token
    inv: torch.Tensor  # (N,) int32: sorted row of each pair
    offsets: torch.Tensor  # (E+1,) int32: rows of expert e are offsets[e]:offsets[e+1]; rows from
    # offsets[E] on are pairs of experts absent from this shard (expert_ids given), in no tile
    tile_expert: torch.Tensor  # (n_tiles,) int32: expert of each row tile, E when unused
    tile_row0: torch.Tensor  # (n_tiles,) int32: first row of each tile
    block_m: int  # rows per tile


def local_slots(flat: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Expert parallel: the local slot (index into the shard's weights) of each global expert id in
    `flat`, or E_local = len(expert_ids) for an expert this shard does not hold. Device ops only
    (sort + searchsorted over the E_local ids), static shapes, no host synchronisation."""
    n_local = expert_ids.numel()
    if n_local == 0:
        return torch.zeros_like(flat)  # slot 0 = E_local: nothing present
    ids_sorted, perm = torch.sort(expert_ids.reshape(-1).to(flat.dtype))
    pos = torch.searchsorted(ids_sorted, flat).clamp_(max=n_local - 1)
    present = ids_sorted[pos] == flat
    return torch.where(present, perm[pos].to(flat.dtype), torch.full_like(flat, n_local))


def routing(top_k_index: torch.Tensor, num_experts: int, block_m: int = BLOCK_M, expert_ids=None) -> Routing:
    """Routing metadata for top_k_index (T, k) with values in [0, num_experts): device ops only,
    static shapes (a function of T, k, E and block_m), no host synchronisation.

    expert_ids (num_experts,) int (expert parallel): the global ids of the experts this shard
    holds, slot i of the weights being expert expert_ids[i]; top_k_index then holds global ids,
    each pair is routed to its local slot, and the pairs of absent experts sort last (slot E, past
    offsets[E]) where no tile covers them: they cost no GEMM work."""
    T, k = top_k_index.shape
    N, E, dev = T * k, num_experts, top_k_index.device
    flat = top_k_index.reshape(N).to(torch.int32)  # any integer dtype; int32 sorts and searches everywhere
    if expert_ids is not None:
        flat = local_slots(flat, expert_ids)
    sorted_e, order = torch.sort(flat, stable=True)  # stable: ties keep pair order
    arange_e = torch.arange(E + 1, device=dev, dtype=sorted_e.dtype)
    offsets = torch.searchsorted(sorted_e, arange_e)  # (E+1,) int64: first row of each expert
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    n_tiles = triton.cdiv(N, block_m) + min(E, N)
    t = torch.arange(n_tiles, device=dev, dtype=tile_end.dtype)
    tile_expert = torch.searchsorted(tile_end, t, right=True)  # E past the last used tile
    e_c = tile_expert.clamp(max=E - 1)
    tile_row0 = offsets[e_c] + (t - (tile_end - tiles)[e_c]) * block_m
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(N, device=dev, dtype=order.dtype))
    i32 = torch.int32
    return Routing(order.to(i32), (order // k).to(i32), inv.to(i32), offsets.to(i32),
                   tile_expert.to(i32), tile_row0.to(i32), block_m)


def block_m_for(n_pairs: int, num_experts: int) -> int:
    """Rows per tile: BLOCK_M, or fewer (down to 16, tl.dot's minimum) when the average expert gets
    fewer pairs than that (many small experts, e.g. E = 128, k = 8 at 4k tokens: 256 pairs each, but
    decode batches give a handful), so that partial tiles do not pad the GEMMs with masked rows."""
    avg = triton.cdiv(max(n_pairs, 1), max(num_experts, 1))
    return max(min(BLOCK_M, triton.next_power_of_2(avg)), min(16, BLOCK_M))


def _w1_view(w1, transposed, interleaved, NI):
    """(stride_e, stride_n, stride_k, up_off, n_step) of gate_up so that element (e, n, h) is W1[e]'s
    output row n, input h, whatever the layout."""
    se, sn, sk = (w1.stride(0), w1.stride(2), w1.stride(1)) if transposed else w1.stride()
    return se, sn, sk, (1 if interleaved else NI), (2 if interleaved else 1)


def _w2_view(w2, transposed):
    """(stride_e, stride_h, stride_i) of down: element (e, h, i) = W2[e]'s output h, input i."""
    return (w2.stride(0), w2.stride(2), w2.stride(1)) if transposed else w2.stride()


def _combine(y, rt, T, k, out_dtype):
    C = y.shape[1]
    out = torch.empty(T, C, device=y.device, dtype=out_dtype)
    if T == 0 or C == 0:
        return out.zero_()
    bt, bc = (32, 128) if INTERPRETING else (16, 128)
    grid = (triton.cdiv(T, bt), triton.cdiv(C, bc))
    n_valid = rt.offsets[-1:]  # on the device: pairs of the experts present
    _combine_kernel[grid](y, rt.inv, n_valid, out, T, C, y.stride(0), out.stride(0), TOP_K=k, BLOCK_T=bt,
                          BLOCK_C=bc)
    return out


def _grouped(a, w_strides, w, bias, scale, rt, nout, E, dtype):
    """y (N, nout) sorted rows = [scale_r] (a[r] W[e]^T + b[e]) with W element (e, n, k) at w_strides."""
    N, K = a.shape
    y = torch.empty(N, nout, device=a.device, dtype=dtype)
    if N == 0 or nout == 0:
        return y
    upcast, prec = _dot_flags(a.dtype)
    grid = (rt.tile_expert.numel(), triton.cdiv(nout, BLOCK_N))
    _down_kernel[grid](
        a, w, bias if bias is not None else a, scale if scale is not None else a, y,
        rt.sorted_pair, rt.tile_expert, rt.tile_row0, rt.offsets,
        E, nout, K, a.stride(0), *w_strides, bias.stride(0) if bias is not None else 0, y.stride(0),
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, UPCAST=upcast, DOT_PREC=prec,
        BLOCK_M=rt.block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)
    return y


def moe_forward(x, top_k_index, top_k_weights, w1, w2, b1, b2, cfg, expert_ids=None):
    """out (T, H) for x (T, H) contiguous rows; cfg = (activation, alpha, limit, interleaved, transposed).
    expert_ids: see routing (expert parallel: the output is this shard's part of the sum)."""
    activation, alpha, limit, interleaved, transposed = cfg
    T, H = x.shape
    k = top_k_index.shape[1]
    E = w1.shape[0]
    NI = w2.shape[1] if transposed else w2.shape[2]
    assert x.stride(-1) == 1 or H <= 1
    rt = routing(top_k_index, E, block_m_for(T * k, E), expert_ids)
    N = T * k
    a = torch.empty(N, NI, device=x.device, dtype=x.dtype)
    upcast, prec = _dot_flags(x.dtype)
    if N > 0 and NI > 0:
        se, sn, sk, up_off, n_step = _w1_view(w1, transposed, interleaved, NI)
        grid = (rt.tile_expert.numel(), triton.cdiv(NI, BLOCK_N))
        _up_kernel[grid](
            x, w1, b1 if b1 is not None else x, a, rt.sorted_tok, rt.tile_expert, rt.tile_row0, rt.offsets,
            E, NI, H, x.stride(0), se, sn, sk, b1.stride(0) if b1 is not None else 0, a.stride(0),
            up_off, float(alpha), float(limit), N_STEP=n_step, ACT=ACTIVATIONS[activation],
            HAS_BIAS=b1 is not None, UPCAST=upcast, DOT_PREC=prec,
            BLOCK_M=rt.block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)
    else:
        a.zero_()
    y = _grouped(a, _w2_view(w2, transposed), w2, b2, top_k_weights.reshape(N), rt, H, E, x.dtype)
    return _combine(y, rt, T, k, x.dtype)


def moe_backward(dout, x, top_k_index, top_k_weights, w1, w2, b1, b2, cfg, expert_ids=None):
    """Gradients (dx, dw (T, k), dw1, dw2, db1 or None, db2 or None) of moe_forward's output
    (with expert_ids: dx and dw are this shard's parts, 0 from absent experts' pairs)."""
    activation, alpha, limit, interleaved, transposed = cfg
    T, H = x.shape
    k = top_k_index.shape[1]
    E = w1.shape[0]
    NI = w2.shape[1] if transposed else w2.shape[2]
    N = T * k
    dev, dt = x.device, x.dtype
    rt = routing(top_k_index, E, block_m_for(T * k, E), expert_ids)
    rw = top_k_weights.reshape(N)
    a = torch.empty(N, NI, device=dev, dtype=dt)
    dgu = torch.empty(N, 2 * NI, device=dev, dtype=dt)
    n_cb = triton.cdiv(NI, BLOCK_N)
    dw_part = torch.zeros(max(n_cb, 1), N, device=dev, dtype=torch.float32)
    se, sn, sk, up_off, n_step = _w1_view(w1, transposed, interleaved, NI)
    s2 = _w2_view(w2, transposed)
    upcast, prec = _dot_flags(dt)
    if N > 0 and NI > 0:
        grid = (rt.tile_expert.numel(), n_cb)
        _up_bwd_kernel[grid](
            dout, x, w1, b1 if b1 is not None else x, w2, b2 if b2 is not None else x, rw, a, dgu, dw_part,
            rt.sorted_tok, rt.sorted_pair, rt.tile_expert, rt.tile_row0, rt.offsets,
            E, NI, H, N, dout.stride(0), x.stride(0), se, sn, sk, b1.stride(0) if b1 is not None else 0,
            *s2, b2.stride(0) if b2 is not None else 0, a.stride(0), dgu.stride(0),
            up_off, float(alpha), float(limit), N_STEP=n_step, ACT=ACTIVATIONS[activation],
            HAS_B1=b1 is not None, HAS_B2=b2 is not None, UPCAST=upcast, DOT_PREC=prec,
            BLOCK_M=rt.block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)
    # d w (T, k): the column-block partials summed in a fixed order, back in pair order
    dw = dw_part.sum(0)[rt.inv.long()].reshape(T, k).to(top_k_weights.dtype)
    # d x: per pair d(gate|up) W1[e], then the fixed-order combine (weight 1)
    w1_as_nk = (se, sk, sn)  # element (e, n=h, k=gate_up row)
    dx_pairs = _grouped(dgu, w1_as_nk, w1, None, None, rt, H, E, dt)
    dx = _combine(dx_pairs, rt, T, k, dt)
    # weight gradients, in the weights' own layouts
    dw1 = torch.empty_like(w1, memory_format=torch.contiguous_format)
    dw2 = torch.empty_like(w2, memory_format=torch.contiguous_format)
    db1 = torch.empty_like(b1) if b1 is not None else None
    db2 = torch.empty_like(b2) if b2 is not None else None
    # dW2[e] (h, i) = sum_r (w_r dout[tok r])^T a_r
    d2 = _w2_view(dw2, transposed)
    _wgrad_launch(dout, a, rw, rt, E, H, NI, dw2, d2, db2, gather_a=True, gather_b=False)
    # dW1[e] (n, h) = sum_r dgu_r^T x[tok r]
    d1 = _w1_view(dw1, transposed, interleaved, NI)[:3]
    _wgrad_launch(dgu, x, None, rt, E, 2 * NI, H, dw1, d1, db1, gather_a=False, gather_b=True)
    return dx, dw, dw1, dw2, db1, db2


def _wgrad_launch(aop, bop, scale, rt, E, nw, cw, dw, strides, db, gather_a, gather_b):
    if E == 0 or nw == 0 or cw == 0:
        if db is not None:
            db.zero_()
        return
    upcast, prec = _dot_flags(aop.dtype)
    grid = (E, triton.cdiv(nw, BLOCK_N), triton.cdiv(cw, BLOCK_K))
    _wgrad_kernel[grid](
        aop, bop, scale if scale is not None else aop, dw, db if db is not None else dw,
        rt.sorted_tok, rt.sorted_pair, rt.offsets, nw, cw,
        aop.stride(0), bop.stride(0), *strides, db.stride(0) if db is not None else 0,
        GATHER_A=gather_a, GATHER_B=gather_b, HAS_SCALE=scale is not None, HAS_BIAS=db is not None,
        UPCAST=upcast, DOT_PREC=prec, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)


def compile_variants(quick: bool):
    """Every launch that selects different code: each activation, both layouts, with and without
    biases, forward and backward, per dtype, and the row-tile sizes block_m_for picks (64 with many
    pairs per expert, 32, 16 with few) (tools/gpu_compile_check.py compiles them)."""
    dtypes = [torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32]
    H, NI, k = 64, 64, 2
    shapes = [(64, 16)] if quick else [(256, 4), (64, 4), (64, 16)]  # (T, E): block_m 64, 32, 16
    for dt in dtypes:
        for T, E in shapes:
            x = torch.randn(T, H, dtype=dt)
            idx = torch.randint(0, E, (T, k))
            w = torch.rand(T, k, dtype=dt)
            # (transposed, interleaved, gate_up bias, down bias)
            layouts = ((False, False, False, False), (True, True, True, True), (False, True, True, False),
                       (True, False, False, True))
            combos = [(a, lay) for a in ACTIVATIONS for lay in layouts]
            if quick or (T, E) != (64, 4):  # plain SwiGLU, and gpt-oss's layout and activation
                combos = [("silu", layouts[0]), ("clamped_swiglu", layouts[1])]
            for act, (transposed, interleaved, bias1, bias2) in combos:
                w1 = torch.randn(E, H, 2 * NI, dtype=dt) if transposed else torch.randn(E, 2 * NI, H, dtype=dt)
                w2 = torch.randn(E, NI, H, dtype=dt) if transposed else torch.randn(E, H, NI, dtype=dt)
                b1 = torch.randn(E, 2 * NI, dtype=dt) if bias1 else None
                b2 = torch.randn(E, H, dtype=dt) if bias2 else None
                cfg = (act, 1.702, 7.0, interleaved, transposed)
                moe_forward(x, idx, w, w1, w2, b1, b2, cfg)
                moe_backward(torch.randn(T, H, dtype=dt), x, idx, w, w1, w2, b1, b2, cfg)
            if not quick:  # expert parallel: the same kernels, the combine masking absent experts' rows
                half = torch.arange(E // 2 + 1)
                moe_forward(x, idx, w, w1[half], w2[half], None, None, cfg, half)
