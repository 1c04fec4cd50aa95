"""Backward kernels: the gate/up backward with the recompute, the weight-gradient grouped GEMM
(the math in __init__.py)."""
import triton
import triton.language as tl

from .activation import _glu, _glu_grad
from .routing import _tile


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
