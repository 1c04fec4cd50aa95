"""Linear cross-entropy and linear log-probs: the host loop over row chunks that never holds the
(M, C) logits (see __init__.py)."""
import math

import torch
import triton

from .._common import stat_dtype
from .launch import _wsum, cross_entropy_forward


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
