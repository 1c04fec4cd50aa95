"""Cross-entropy over rows of logits, forward and backward, and the chunked linear cross-entropy
that never holds the (N, C) logits.

Rows: logits x (M, C) (last dim contiguous, rows at any stride), one row per program, the class
dim walked in BLOCK_C chunks. All math in fp32 (fp64 for fp64 logits), cast at the store.

Per row, with lse = log sum_c exp(x_c), p_c = exp(x_c - lse), class weights w (1 without),
smoothing eps and W = sum_c w_c:
  class index y:  l = (1 - eps) w_y (lse - x_y) + eps / C * (W lse - sum_c w_c x_c)   (0 if ignored)
                  dl/dx_c = (1 - eps) w_y (p_c - [c = y]) + eps / C * (W p_c - w_c)
  probabilities t, t'_c = (1 - eps) t_c + eps / C, A = sum_c w_c t'_c:
                  l = A lse - sum_c w_c t'_c x_c,   dl/dx_c = A p_c - w_c t'_c
Log-probs and entropy (linear_log_probs): the row is read as x * scale (scale = 1 / temperature),
log p_y = -l (no weights, no smoothing), and with ENTROPY also H = -sum_c p_c log p_c = lse - sum_c
p_c x_c, accumulated as r = sum_c e^(x_c - m) (x_c - m) beside s so that H = log s - r / s (never
lse minus a number of the logits' size), with dH/dx_c = -p_c (x_c - lse + H) (scaled by the
entropy's upstream gradient g2 and added to the cross-entropy's d).
The true-class term p_y - 1 is computed as expm1(x_y - lse), never as p_y - 1: when p_y is close
to 1 the subtraction cancels (in a 16-bit dtype it is all rounding error), expm1 keeps every digit.
The gradient is scaled per row by g (the upstream gradient of that row's loss; for 'mean' the
host folds the 1 / sum of weights into it); ignored rows get exactly 0.

lse is an online (max, sum) pass per lane, merged at the end, as in softmax.py: huge logits
never overflow, a NaN logit poisons its row's loss like torch.

Linear cross-entropy (host loop, `linear_cross_entropy_forward/backward`, and the log-probs of
linear_log_probs_forward/backward through the same loop): for each chunk of
rows, logits = x_chunk @ W^T + b by one torch matmul, the row kernel writes d(logits) over that
chunk in place, then dx_chunk = dlogits @ W and dW += dlogits^T @ x_chunk, db += colsum(dlogits)
in fp32 across chunks (cast once at the end), in a fixed order: deterministic, no atomics.
Memory: O(M H + C H) plus one (chunk, C) buffer; the (M, C) logits never exist.
"""
import math

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, as_rows, stat_dtype

MAX_BLOCK_C = 4096  # class-dim chunk of the row kernel


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


def _block_c(C: int):
    block = min(triton.next_power_of_2(max(C, 1)), MAX_BLOCK_C)
    return block, (8 if block >= 2048 else 4)


def _targets(target: torch.Tensor, C: int):
    """(M,) class indices (int64) or (M, C) probabilities with a contiguous last dim."""
    if target.is_floating_point():
        return as_rows(target), True
    return target.reshape(-1).to(torch.int64), False


def _wsum(weight, C):
    # sum of the class weights, needed only with label smoothing (a host float: one sync)
    return float(weight.double().sum()) if weight is not None else float(C)


def cross_entropy_forward(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                          grad_scale=None, dlogits=None, wsum=None, scale=1.0, ent=None, grad_ent=None):
    """Per-row cross-entropy. logits (M, C); target (M,) int64 or (M, C) float; weight (C,) or
    None. Returns (loss (M,) fp32 unreduced, lse (M,) fp32). With `grad_scale` ((M,) or a
    1-element tensor, the upstream gradient of each row's loss) it also writes d(loss)/d(logits)
    into `dlogits` ((M, C), logits' dtype; may be `logits` itself, overwritten in place).
    `scale`: the rows are logits * scale (1 / temperature; the gradient is then with respect to
    the scaled logits: the caller folds `scale` into grad_scale / grad_ent). `ent` ((M,) fp32,
    class-index targets): also write each row's entropy there (0 on ignored rows), and with
    `grad_scale` add grad_ent ((M,) or 1 element) times its gradient to dlogits."""
    x = as_rows(logits)
    M, C = x.shape
    loss = torch.empty(M, dtype=torch.float32, device=x.device)
    lse = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return loss, lse
    t, prob = _targets(target, C)
    smooth = label_smoothing != 0.0
    if wsum is None:
        wsum = _wsum(weight, C) if smooth and not prob else 0.0
    write = grad_scale is not None
    if write:
        assert dlogits is not None and dlogits.shape == x.shape and dlogits.stride(-1) == 1
        g = grad_scale.reshape(-1).to(torch.float32)
        stride_g = 0 if g.numel() == 1 else g.stride(0)
    else:
        g, stride_g, dlogits = loss, 0, loss
    entropy = ent is not None
    assert not (entropy and prob), "entropy with class-index targets only"
    if entropy and write and grad_ent is not None:
        g2 = grad_ent.reshape(-1).to(torch.float32)
        stride_g2 = 0 if g2.numel() == 1 else g2.stride(0)
    else:
        g2, stride_g2 = torch.zeros(1, dtype=torch.float32, device=x.device), 0
    block_c, num_warps = _block_c(C)
    _cross_entropy_fwd_kernel[(M,)](
        x, x.stride(0), t, t.stride(0) if prob else 1, weight if weight is not None else x,
        loss, lse, g, stride_g, dlogits, dlogits.stride(0) if write else 0,
        ent if entropy else loss, g2, stride_g2,
        C, ignore_index, float(label_smoothing), wsum, float(scale),
        HAS_WEIGHT=weight is not None, PROB_TARGET=prob, SMOOTH=smooth, WRITE_GRAD=write,
        ENTROPY=entropy, ACC_DTYPE=acc_dtype(x.dtype), BLOCK_C=block_c, num_warps=num_warps,
    )
    return loss, lse


def cross_entropy_backward(grad, logits, target, weight, lse, ignore_index=-100, label_smoothing=0.0,
                           wsum=None):
    """d(loss)/d(logits) for cross_entropy_forward's per-row losses: grad (M,) (any stride,
    stride 0 included), logits (M, C), lse (M,) from the forward -> (M, C) in logits' dtype."""
    x = as_rows(logits)
    M, C = x.shape
    dx = torch.empty((M, C), dtype=x.dtype, device=x.device)
    if M == 0 or C == 0:
        return dx.zero_()
    t, prob = _targets(target, C)
    smooth = label_smoothing != 0.0
    if wsum is None:
        wsum = _wsum(weight, C) if smooth and not prob else 0.0
    g = grad.reshape(-1) if grad.numel() == M else grad.reshape(1)
    stride_g = 0 if g.numel() == 1 else g.stride(0)
    block_c, num_warps = _block_c(C)
    _cross_entropy_bwd_kernel[(M,)](
        x, x.stride(0), t, t.stride(0) if prob else 1, weight if weight is not None else x,
        lse, g, stride_g, dx, dx.stride(0), C, ignore_index, float(label_smoothing), wsum,
        HAS_WEIGHT=weight is not None, PROB_TARGET=prob, SMOOTH=smooth,
        ACC_DTYPE=acc_dtype(x.dtype), BLOCK_C=block_c, num_warps=num_warps,
    )
    return dx


# ----------------------------------------------------------------------------------------------
# Linear cross-entropy: the host loop over row chunks
# ----------------------------------------------------------------------------------------------
MIN_CHUNK = 1 << 21  # elements of the smallest (rows, C) chunk: tiny matmuls cost more than they save


def chunk_rows(M: int, H: int, C: int) -> int:
    """Rows per chunk: the (chunk, C) logits buffer about the size of the (M, H) input
    (next_pow2(ceil(M / ceil(C / H)))), at least MIN_CHUNK elements, at most M rows."""
    rows = math.ceil(M / max(1, math.ceil(C / max(H, 1))))
    rows = max(rows, math.ceil(MIN_CHUNK / max(C, 1)))
    return max(1, min(M, triton.next_power_of_2(rows)))


def _addmm_fp32(acc, a, b):
    """acc += a @ b with an fp32 result whatever a and b's dtype: 16-bit operands keep the tensor
    cores on CUDA (torch.mm's out_dtype), and are upcast elsewhere."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        acc += torch.mm(a, b, out_dtype=acc.dtype)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _linear_ce_loop(x, w, b, target, weight, ignore_index, label_smoothing, grad, chunk, scale=1.0,
                    ent=None, grad_ent=None):
    """The shared loop. x (M, H); w (C, H); b (C,) or None; target (M,) or (M, C); grad None
    (forward: losses only) or (M,)/(1,) per-row upstream gradients (backward: recompute each
    chunk's logits, write their gradient in place, accumulate dx, dw, db). `scale`, `ent` and
    `grad_ent` go to cross_entropy_forward per chunk (log-probs and entropy: linear_log_probs_*)."""
    M, H = x.shape
    C = w.shape[0]
    loss = torch.empty(M, dtype=torch.float32, device=x.device)
    lse = torch.empty(M, dtype=torch.float32, device=x.device)
    acc = stat_dtype(w.dtype)
    dx = torch.empty_like(x) if grad is not None else None
    dw = torch.zeros(C, H, dtype=acc, device=x.device) if grad is not None else None
    db = torch.zeros(C, dtype=acc, device=x.device) if grad is not None and b is not None else None
    wsum = _wsum(weight, C) if label_smoothing != 0.0 and not target.is_floating_point() else 0.0
    chunk = chunk or chunk_rows(M, H, C)
    for s in range(0, M, chunk):
        e = min(M, s + chunk)
        xc = x[s:e]  # (m, H)
        logits = torch.nn.functional.linear(xc, w, b)  # (m, C): the only (rows, C) buffer
        g = g2 = None
        if grad is not None:
            g = grad if grad.numel() == 1 else grad[s:e]
        if grad_ent is not None:
            g2 = grad_ent if grad_ent.numel() == 1 else grad_ent[s:e]
        loss[s:e], lse[s:e] = cross_entropy_forward(
            logits, target[s:e], weight, ignore_index, label_smoothing, g,
            dlogits=logits if g is not None else None, wsum=wsum, scale=scale,
            ent=ent[s:e] if ent is not None else None, grad_ent=g2)
        if grad is not None:
            dx[s:e] = logits @ w  # (m, H), fp32 accumulation inside the matmul
            _addmm_fp32(dw, logits.t(), xc)  # (C, H) += (C, m) @ (m, H), fp32 across chunks
            if db is not None:
                db += logits.sum(0, dtype=acc)
        del logits
    return loss, lse, dx, dw, db


def linear_cross_entropy_forward(x, w, b, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                                 chunk=None):
    """Per-row cross_entropy(x @ w^T + b, target) without the (M, C) logits: x (M, H), w (C, H),
    b (C,) or None, target (M,) int64 or (M, C) float. Returns (loss (M,) fp32, lse (M,) fp32)."""
    loss, lse, _, _, _ = _linear_ce_loop(x, w, b, target, weight, ignore_index, label_smoothing,
                                         None, chunk)
    return loss, lse


def linear_cross_entropy_backward(grad, x, w, b, target, weight=None, ignore_index=-100,
                                  label_smoothing=0.0, chunk=None):
    """Gradients of sum_n grad_n * loss_n (grad (M,) or a 1-element tensor): returns (dx (M, H)
    in x's dtype, dw (C, H) in w's dtype, db (C,) in b's dtype or None), dw and db accumulated in
    fp32 across chunks and cast once. The logits are recomputed chunk by chunk."""
    _, _, dx, dw, db = _linear_ce_loop(x, w, b, target, weight, ignore_index, label_smoothing,
                                       grad, chunk)
    return dx, dw.to(w.dtype), (db.to(b.dtype) if db is not None else None)


def linear_log_probs_forward(x, w, b, target, ignore_index=-100, temperature=1.0, entropy=False, chunk=None):
    """Per-row log_softmax(x @ w^T + b) / temperature)[target] and (entropy) the row's entropy,
    through the linear cross-entropy loop (log p_y = -cross-entropy, no weights, no smoothing): x
    (M, H), w (C, H), b (C,) or None, target (M,) int64. Returns (logp (M,) fp32, ent (M,) fp32 or
    None); both 0 on ignored rows. The (M, C) logits never exist."""
    ent = torch.empty(x.shape[0], dtype=torch.float32, device=x.device) if entropy else None
    loss, _, _, _, _ = _linear_ce_loop(x, w, b, target, None, ignore_index, 0.0, None, chunk,
                                       scale=1.0 / temperature, ent=ent)
    return loss.neg_().add_(0.0), ent  # + 0.0 turns the ignored rows' -0.0 into 0.0


def linear_log_probs_backward(grad_logp, grad_ent, x, w, b, target, ignore_index=-100, temperature=1.0,
                              entropy=False, chunk=None):
    """Gradients of sum_n grad_logp_n logp_n + grad_ent_n ent_n (each (M,) or 1 element; grad_ent
    None: 0): (dx, dw, db) as linear_cross_entropy_backward, logits recomputed chunk by chunk.
    d/dz of log p_y = -(d/dz of the cross-entropy); the 1 / temperature of the scaled logits is
    folded into both upstream gradients."""
    inv_t = 1.0 / temperature
    g = grad_logp.to(torch.float32) * -inv_t
    g2 = grad_ent.to(torch.float32) * inv_t if (entropy and grad_ent is not None) else None
    ent = torch.empty(x.shape[0], dtype=torch.float32, device=x.device) if entropy else None
    _, _, dx, dw, db = _linear_ce_loop(x, w, b, target, None, ignore_index, 0.0, g, chunk,
                                       scale=inv_t, ent=ent, grad_ent=g2)
    return dx, dw.to(w.dtype), (db.to(b.dtype) if db is not None else None)


def compile_variants(quick: bool):
    """Every variant that selects different code: dtypes, class weights, smoothing, probability
    targets, the forward with and without the in-place gradient, the backward; block sizes from
    short to looped class dims. `quick`: bf16 only, one looped class dim, weights and smoothing
    together (12 kernels instead of 144); plus, per dtype, the log-prob forward with ENTROPY and a
    logit scale, with and without the in-place gradient."""
    dtypes = [torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32]
    options = [(False, 0.0), (True, 0.1)] if quick else [(False, 0.0), (True, 0.0), (False, 0.1), (True, 0.1)]
    for dt in dtypes:
        for C in ([50257] if quick else [7, 1000, 50257]):
            x = torch.randn(8, C, dtype=dt)
            t = torch.randint(0, C, (8,))
            p = torch.rand(8, C, dtype=dt)
            for has_w, eps in options:
                weight = torch.rand(C) if has_w else None
                for target in (t, p):
                    loss, lse = cross_entropy_forward(x, target, weight, -100, eps)
                    cross_entropy_forward(x, target, weight, -100, eps, torch.ones(1), x.clone())
                    cross_entropy_backward(torch.ones(8), x, target, weight, lse, -100, eps)
        # log-probs and entropy (linear_log_probs): temperature scale, ENTROPY with and without the grad
        ent = torch.empty(8)
        cross_entropy_forward(x, t, None, -100, 0.0, scale=0.7, ent=ent)
        cross_entropy_forward(x, t, None, -100, 0.0, torch.ones(1), x.clone(), scale=0.7, ent=ent,
                              grad_ent=torch.ones(8))
