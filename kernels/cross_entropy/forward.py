"""The row kernel of the forward (optionally writing d(logits) in place) and the gradient pass it
shares with the backward (the formulas in __init__.py)."""
import triton
import triton.language as tl


@triton.jit
def _expm1(z):
    # exp(z) - 1 without cancellation near 0 (z = x_y - lse <= 0): Taylor to z^5 for |z| < 0.1
    # (relative error < z^5 / 720 < 2e-9), exp(z) - 1 beyond (no cancellation there).
    small = z * (1.0 + z * (0.5 + z * (1.0 / 6.0 + z * (1.0 / 24.0 + z * (1.0 / 120.0)))))
    return tl.where(tl.abs(z) < 0.1, small, tl.exp(z) - 1.0)


@triton.jit
def _grad_pass(
    x_row, t_row, dx_row, CW,  # row pointers (logits, probability targets, dlogits), class weights
    C, y, valid, w_y, pm1, lse, A, g, eps, wsum,
    scale, g2, ent,  # logit scale (1 / temperature); entropy: its upstream gradient and value (ENTROPY)
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr,
    ENTROPY: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_C)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        mask = c < C
        x = tl.load(x_row + c, mask=mask, other=0.0).to(ACC_DTYPE) * scale
        p = tl.exp(x - lse)
        if HAS_WEIGHT:
            w = tl.load(CW + c, mask=mask, other=0.0).to(ACC_DTYPE)
        else:
            w = tl.full((BLOCK_C,), 1.0, ACC_DTYPE)
        if PROB_TARGET:
            t = tl.load(t_row + c, mask=mask, other=0.0).to(ACC_DTYPE)
            d = A * p - w * (t * (1.0 - eps) + eps / C)
        else:
            d = (1.0 - eps) * w_y * tl.where(c == y, pm1, p)
            if SMOOTH:
                d += eps / C * (wsum * p - w)
            d = tl.where(valid, d, 0.0)
        # an ignored row is exactly 0 even when g is inf (a 'mean' over no row)
        d = tl.where(d == 0.0, 0.0, d * g)
        if ENTROPY:
            # dH/dx_c = -p_c (x_c - lse + H) = -p_c (log p_c + H); 0 where p_c is 0 (an -inf logit)
            d += tl.where(valid & (p != 0.0), -g2 * p * (x - lse + ent), 0.0)
        tl.store(dx_row + c, d.to(dx_row.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_fwd_kernel(
    X, stride_xm,  # (M, C) logits, last dim contiguous
    T, stride_tm,  # (M,) int64 class indices, or (M, C) probabilities (PROB_TARGET), last dim contiguous
    CW,  # (C,) class weights (HAS_WEIGHT)
    LOSS, LSE,  # (M,) fp32 per-row loss (unreduced) and logsumexp
    G, stride_g,  # (M,) per-row gradient scale (WRITE_GRAD); stride 0 = one scalar for every row
    DX, stride_dxm,  # (M, C) d(loss)/d(logits) (WRITE_GRAD); may be X itself (in place)
    ENT, G2, stride_g2,  # (M,) fp32 entropy out, its upstream gradient (ENTROPY; G2 read if WRITE_GRAD)
    C, ignore_index, eps, wsum,  # classes, ignored target, label smoothing, sum of class weights
    scale,  # every logit is read as x * scale (1 / temperature; 1.0 for cross-entropy)
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr,
    WRITE_GRAD: tl.constexpr, ENTROPY: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 row offsets: M * C may exceed 2^31
    x_row = X + row * stride_xm
    t_row = T + row * stride_tm
    cols = tl.arange(0, BLOCK_C)
    m = tl.full((BLOCK_C,), float("-inf"), ACC_DTYPE)  # per-lane running max
    s = tl.zeros((BLOCK_C,), ACC_DTYPE)  # per-lane sum of exp(x - m)
    sum_wx = tl.zeros((BLOCK_C,), ACC_DTYPE)  # sum_c w_c x_c (smoothing) or sum_c w_c t'_c x_c
    sum_a = tl.zeros((BLOCK_C,), ACC_DTYPE)  # sum_c w_c t'_c (probabilities)
    r = tl.zeros((BLOCK_C,), ACC_DTYPE)  # per-lane sum of exp(x - m) (x - m) (ENTROPY)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        mask = c < C
        x = tl.load(x_row + c, mask=mask, other=float("-inf")).to(ACC_DTYPE) * scale
        m_new = tl.maximum(m, x)
        # where() only on the -inf cases, never around a NaN: a NaN x must reach s
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
        if ENTROPY:
            # relative to the running max, so H = log s - r / s never cancels large logits:
            # sum e^(x-m') (x-m') = alpha (r + (m - m') s) over the old terms, plus the new one
            r = alpha * (r + tl.where(s > 0.0, (m - m_new) * s, 0.0)) + tl.where(
                x == float("-inf"), 0.0, tl.exp(x - m_new) * (x - m_new))
        s = s * alpha + tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
        m = m_new
        if PROB_TARGET or SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(CW + c, mask=mask, other=0.0).to(ACC_DTYPE)
            else:
                w = tl.where(mask, 1.0, 0.0).to(ACC_DTYPE)
            if PROB_TARGET:
                t = tl.load(t_row + c, mask=mask, other=0.0).to(ACC_DTYPE)
                w = tl.where(mask, w * (t * (1.0 - eps) + eps / C), 0.0)
                sum_a += w
            sum_wx += tl.where(mask, w * x, 0.0)
    row_max = tl.max(m, axis=0)
    merge = tl.where(m == row_max, 1.0, tl.exp(m - row_max))
    if ENTROPY:
        r = merge * (r + tl.where(s > 0.0, (m - row_max) * s, 0.0))
    s = s * merge
    s_row = tl.sum(s, axis=0)
    lse = row_max + tl.log(s_row)
    ent = tl.log(s_row) - tl.sum(r, axis=0) / s_row  # -sum_c p_c log p_c (ENTROPY)
    A = tl.sum(sum_a, axis=0)
    if PROB_TARGET:
        y = 0
        valid = True
        w_y = 0.0
        pm1 = 0.0
        loss = A * lse - tl.sum(sum_wx, axis=0)
    else:
        y = tl.load(t_row)
        valid = y != ignore_index
        in_range = (y >= 0) & (y < C)
        yc = tl.where(valid & in_range, y, 0)  # never an out-of-bounds load
        x_y = tl.load(x_row + yc).to(ACC_DTYPE) * scale
        if HAS_WEIGHT:
            w_y = tl.load(CW + yc).to(ACC_DTYPE)
        else:
            w_y = 1.0
        w_y = tl.where(valid, w_y, 0.0)
        pm1 = _expm1(x_y - lse)
        # (max - x_y) + log s, not lse - x_y: no rounding of lse at the logits' magnitude
        loss = (1.0 - eps) * w_y * ((row_max - x_y) + tl.log(s_row))
        if SMOOTH:
            loss += eps / C * (wsum * lse - tl.sum(sum_wx, axis=0))
        loss = tl.where(valid, loss, 0.0)
        # a target out of [0, C) (the host checks, outside torch.compile) gives NaN, not a fault
        loss = tl.where(valid & (~in_range), float("nan"), loss)
        ent = tl.where(valid & (~in_range), float("nan"), tl.where(valid, ent, 0.0))
        y = yc
    tl.store(LOSS + row, loss.to(tl.float32))
    tl.store(LSE + row, lse.to(tl.float32))
    if ENTROPY:
        tl.store(ENT + row, ent.to(tl.float32))
    if WRITE_GRAD:
        g = tl.load(G + row * stride_g).to(ACC_DTYPE)
        g2 = 0.0
        if ENTROPY:
            g2 = tl.load(G2 + row * stride_g2).to(ACC_DTYPE)
        _grad_pass(x_row, t_row, DX + row * stride_dxm, CW, C, y, valid, w_y, pm1, lse, A, g, eps,
                   wsum, scale, g2, ent, HAS_WEIGHT, PROB_TARGET, SMOOTH, ENTROPY, ACC_DTYPE, BLOCK_C)
