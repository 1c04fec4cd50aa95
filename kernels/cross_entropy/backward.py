"""The row kernel of the backward (the formulas in __init__.py)."""
import triton
import triton.language as tl

from .forward import _expm1, _grad_pass


@triton.jit
def _cross_entropy_bwd_kernel(
    X, stride_xm,  # (M, C) logits saved by the forward (read only)
    T, stride_tm,  # targets as in the forward
    CW,  # (C,) class weights (HAS_WEIGHT)
    LSE,  # (M,) fp32 logsumexp saved by the forward
    G, stride_g,  # (M,) upstream gradient of each row's loss (stride 0: one scalar)
    DX, stride_dxm,  # (M, C) output: d(loss)/d(logits)
    C, ignore_index, eps, wsum,
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    t_row = T + row * stride_tm
    lse = tl.load(LSE + row).to(ACC_DTYPE)
    g = tl.load(G + row * stride_g).to(ACC_DTYPE)
    if PROB_TARGET:
        # A = sum_c w_c t'_c: one pass over the targets only
        cols = tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_C,), ACC_DTYPE)
        for start in range(0, C, BLOCK_C):
            c = start + cols
            mask = c < C
            t = tl.load(t_row + c, mask=mask, other=0.0).to(ACC_DTYPE)
            if HAS_WEIGHT:
                w = tl.load(CW + c, mask=mask, other=0.0).to(ACC_DTYPE)
            else:
                w = tl.full((BLOCK_C,), 1.0, ACC_DTYPE)
            acc += tl.where(mask, w * (t * (1.0 - eps) + eps / C), 0.0)
        A = tl.sum(acc, axis=0)
        y = 0
        valid = True
        w_y = 0.0
        pm1 = 0.0
    else:
        A = 0.0
        y = tl.load(t_row)
        valid = (y != ignore_index) & (y >= 0) & (y < C)
        y = tl.where(valid, y, 0)
        x_y = tl.load(x_row + y).to(ACC_DTYPE)
        if HAS_WEIGHT:
            w_y = tl.load(CW + y).to(ACC_DTYPE)
        else:
            w_y = 1.0
        pm1 = _expm1(x_y - lse)
    _grad_pass(x_row, t_row, DX + row * stride_dxm, CW, C, y, valid, w_y, pm1, lse, A, g, eps,
               wsum, 1.0, 0.0, 0.0, HAS_WEIGHT, PROB_TARGET, SMOOTH, False, ACC_DTYPE, BLOCK_C)
